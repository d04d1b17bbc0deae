"""Bearer tokens and SMART scopes: 401 vs 403, key sources, scope forms, transactions, patient context."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from lxml import etree

from iop_fhir.api import auth
from iop_fhir.api.auth import (
    IOP_TYPES,
    OPERATION_READS,
    Client,
    Forbidden,
    Grant,
    KeysUnavailable,
    Need,
    TokenVerifier,
    Unauthorized,
    authorize,
    classify,
    current_client,
    parse_scope,
)
from iop_fhir.config import ConfigError
from iop_fhir.generate import generate_cohort
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.record import validate_record

SECRET = "a-development-secret-of-32-bytes-or-more"
ISSUER = "https://auth.example.org"
AUDIENCE = "https://gateway.example.org/fhir"


def hs256(scope: str = "system/*.cruds", secret: str = SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "app-1", "client_id": "app-1", "scope": scope, "iat": now, "exp": now + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(make_app) -> Flask:
    return make_app(AUTH="on", JWT_SECRET=SECRET)


@pytest.fixture
def api(secured: Flask):
    return secured.test_client()


def outcome(response) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    body = response.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    return body


# --- 401 ----------------------------------------------------------------------------------------


def test_missing_token_is_401_with_a_bare_challenge(api) -> None:
    response = api.get("/fhir/Patient/p1")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="iop-fhir"'
    assert outcome(response)["issue"] == [
        {"severity": "error", "code": "login", "diagnostics": "a bearer token is required (no Authorization header)"}
    ]


def test_other_scheme_is_401(api) -> None:
    response = api.get("/fhir/Patient/p1", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401
    assert "the Authorization scheme is 'Basic', not Bearer" in outcome(response)["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not-a-jwt", "the bearer token is not a JWT"),
        (hs256(exp=int(time.time()) - 120), "the token has expired"),
        (hs256(nbf=int(time.time()) + 600), "the token is not valid yet (nbf or iat in the future)"),
        (hs256(exp=None), "the token has no 'exp' claim"),
        (hs256(secret="another-secret-of-thirty-two-bytes-long"), "the token's signature does not verify"),
        (jwt.encode({"exp": 2**40}, SECRET * 2, algorithm="HS384"), "tokens signed with 'HS384' are not accepted; use HS256, RS256, RS384, ES256, ES384"),
        (jwt.encode({"exp": 2**40}, None, algorithm="none"), "tokens signed with 'none' are not accepted; use HS256, RS256, RS384, ES256, ES384"),
    ],
    ids=["garbage", "expired", "not-yet", "no-exp", "bad-signature", "hs384", "alg-none"],
)
def test_invalid_token_is_401_invalid_token(api, token: str, message: str) -> None:
    response = api.get("/fhir/Patient/p1", headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="iop-fhir", error="invalid_token", error_description="{message.replace(chr(34), chr(39))}"'
    )
    assert outcome(response)["issue"] == [{"severity": "error", "code": "login", "diagnostics": message}]


def test_small_clock_skew_is_tolerated(api) -> None:
    now = int(time.time())
    with api:
        response = api.get("/fhir/Patient/p1", headers=bearer(hs256(exp=now - 10, iat=now + 10)))
        assert response.status_code not in (401, 403)
        assert current_client().client_id == "app-1"


def test_401_in_xml_when_xml_is_wanted(api) -> None:
    response = api.get("/fhir/Patient/p1", headers={"Accept": "application/fhir+xml"})
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/fhir+xml; charset=utf-8"
    root = etree.fromstring(response.data)
    ns = {"f": "http://hl7.org/fhir"}
    assert root.tag == "{http://hl7.org/fhir}OperationOutcome"
    assert root.find("f:issue/f:code", ns).get("value") == "login"


def test_issuer_and_audience_are_checked_when_configured(make_app) -> None:
    api = make_app(AUTH="on", JWT_SECRET=SECRET, JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE).test_client()
    good = hs256(iss=ISSUER, aud=AUDIENCE)
    with api:
        assert api.get("/fhir/Patient/p1", headers=bearer(good)).status_code not in (401, 403)
    wrong_issuer = api.get("/fhir/Patient/p1", headers=bearer(hs256(iss="https://evil.example", aud=AUDIENCE)))
    assert wrong_issuer.status_code == 401
    assert outcome(wrong_issuer)["issue"][0]["diagnostics"] == f"the token's issuer is not {ISSUER}"
    wrong_audience = api.get("/fhir/Patient/p1", headers=bearer(hs256(iss=ISSUER, aud="https://other.example")))
    assert wrong_audience.status_code == 401
    assert outcome(wrong_audience)["issue"][0]["diagnostics"] == f"the token is not meant for this gateway (aud must be {AUDIENCE})"
    no_audience = api.get("/fhir/Patient/p1", headers=bearer(hs256(iss=ISSUER)))
    assert no_audience.status_code == 401


def test_public_paths_need_no_token(api) -> None:
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        response = api.get(path)
        assert response.status_code == 200
        assert response.get_json() == {
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs", "patient/*.cruds", "patient/*.rs", "patient/Patient.r"],
            "capabilities": ["permission-v2", "permission-v1"],
        }
    for path in ("/fhir/metadata", "/iop/schema"):
        assert api.get(path).status_code not in (401, 403), path


def test_smart_configuration_lists_configured_endpoints(make_app) -> None:
    app = make_app(AUTH="on", JWT_SECRET=SECRET, JWT_ISSUER=ISSUER, TOKEN_URL=f"{ISSUER}/token", JWKS_URL=f"{ISSUER}/jwks")
    config = app.test_client().get("/.well-known/smart-configuration").get_json()
    assert config["issuer"] == ISSUER
    assert config["token_endpoint"] == f"{ISSUER}/token"
    assert config["jwks_uri"] == f"{ISSUER}/jwks"
    security = app.extensions["iop_fhir.security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert security["extension"][0]["extension"] == [{"url": "token", "valueUri": f"{ISSUER}/token"}]


# --- 403 ----------------------------------------------------------------------------------------


def test_insufficient_scope_is_403_naming_the_scope(api) -> None:
    response = api.get("/fhir/MedicationRequest?patient=p1", headers=bearer(hs256("system/MedicationRequest.r system/Patient.rs")))
    assert response.status_code == 403
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="iop-fhir", error="insufficient_scope", scope="system/MedicationRequest.s"'
    )
    assert outcome(response)["issue"] == [
        {
            "severity": "error",
            "code": "forbidden",
            "diagnostics": "search-type on MedicationRequest needs the scope system/MedicationRequest.s (or user/MedicationRequest.s)",
        }
    ]


@pytest.mark.parametrize(
    ("scope", "method", "path", "allowed"),
    [
        ("system/MedicationRequest.rs", "GET", "/fhir/MedicationRequest/m1", True),
        ("system/MedicationRequest.rs", "GET", "/fhir/MedicationRequest?status=active", True),
        ("system/MedicationRequest.rs", "PUT", "/fhir/MedicationRequest/m1", False),
        ("system/MedicationRequest.rs", "GET", "/fhir/Observation/o1", False),
        ("system/*.cruds", "DELETE", "/fhir/Observation/o1", True),
        ("system/*.rs", "DELETE", "/fhir/Observation/o1", False),
        ("user/Observation.r", "GET", "/fhir/Observation/o1/_history/2", True),
        ("user/Observation.r", "GET", "/fhir/Observation?code=x", False),
        ("system/Observation.read", "GET", "/fhir/Observation?code=x", True),
        ("system/Observation.read", "POST", "/fhir/Observation", False),
        ("system/Observation.write", "POST", "/fhir/Observation", True),
        ("system/Observation.write", "GET", "/fhir/Observation/o1", False),
        ("system/*.*", "PATCH", "/fhir/Observation/o1", True),
        ("system/Observation.u", "PATCH", "/fhir/Observation/o1", True),
        ("system/Observation.rs?category=laboratory", "GET", "/fhir/Observation/o1", False),
        ("openid fhirUser", "GET", "/fhir/Observation/o1", False),
        ("system/Observation.sr", "GET", "/fhir/Observation/o1", False),  # v2 letters must come in cruds order
        ("system/Observation.c", "PUT", "/fhir/Observation?identifier=s|v", False),
        ("system/Observation.cu", "PUT", "/fhir/Observation?identifier=s|v", True),
        ("system/Patient.r", "GET", "/fhir/Patient/p1/$everything", False),
        ("system/*.rs", "GET", "/fhir/Patient/p1/$everything", True),
        ("system/Patient.r", "POST", "/fhir/Patient/$validate", True),
        ("system/*.rs", "GET", "/fhir/_history", True),
        ("system/Patient.rs", "GET", "/fhir/_history", False),
        ("system/*.rs", "POST", "/iop/records", False),
        ("system/*.cu", "POST", "/iop/records", True),
        ("system/*.r", "GET", "/iop/records/ep-000001", True),
    ],
)
def test_scope_forms(api, scope: str, method: str, path: str, allowed: bool) -> None:
    with api:
        response = api.open(path, method=method, headers=bearer(hs256(scope)))
        if allowed:
            assert response.status_code not in (401, 403), response.get_data(as_text=True)
            assert current_client().scopes == tuple(scope.split())
        else:
            assert response.status_code == 403, response.get_data(as_text=True)


def test_include_needs_read_on_the_included_type(api) -> None:
    path = "/fhir/MedicationRequest?patient=p1&_include=MedicationRequest:patient"
    denied = api.get(path, headers=bearer(hs256("system/MedicationRequest.rs")))
    assert denied.status_code == 403
    assert outcome(denied)["issue"][0]["diagnostics"] == "_include on Patient needs the scope system/Patient.r (or user/Patient.r)"
    assert api.get(path, headers=bearer(hs256("system/MedicationRequest.rs system/Patient.r"))).status_code not in (401, 403)


def test_transaction_entry_outside_the_scopes_is_named(api) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": "final"}, "request": {"method": "PUT", "url": "Observation/o1"}},
            {"request": {"method": "GET", "url": "Patient?name=x"}},
        ],
    }
    response = api.post(
        "/fhir", data=json.dumps(bundle), content_type="application/fhir+json", headers=bearer(hs256("system/Patient.cs system/Observation.r"))
    )
    assert response.status_code == 403
    assert outcome(response)["issue"] == [
        {
            "severity": "error",
            "code": "forbidden",
            "diagnostics": "Bundle.entry[1]: update on Observation needs the scope system/Observation.u (or user/Observation.u)",
            "expression": ["Bundle.entry[1]"],
        }
    ]
    assert response.headers["WWW-Authenticate"].endswith('scope="system/Observation.u"')


def test_transaction_needs_the_type_of_a_mismatched_body_too() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": {"resourceType": "Consent"}, "request": {"method": "POST", "url": "Patient"}}],
    }
    needs = classify("POST", "/fhir", [], {}, lambda: bundle)
    assert [(n.resource_type, n.permissions, n.location) for n in needs] == [
        ("Patient", "c", "Bundle.entry[0]"),
        ("Consent", "c", "Bundle.entry[0]"),
    ]


def test_iop_record_bundle_maps_only_to_iop_types(example_json) -> None:
    """The /iop scopes cover every type a record maps to (checked on generated records too)."""
    records = [example_json, *generate_cohort(5, 3)]
    mapped = {e["resource"]["resourceType"] for r in records for e in record_to_bundle(validate_record(r))["entry"]}
    assert mapped <= set(IOP_TYPES)


# --- patient/ scopes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/fhir/Patient/p1", True),
        ("GET", "/fhir/Patient/p1/_history/1", True),
        ("GET", "/fhir/Patient/p2", False),
        ("GET", "/fhir/Patient?_id=p1", True),
        ("GET", "/fhir/Patient?name=x", True),  # answered with the patient pinned (test_auth_patient.py)
        ("GET", "/fhir/MedicationRequest?patient=p1", True),
        ("GET", "/fhir/MedicationRequest?patient=Patient/p1&status=active", True),
        ("GET", "/fhir/MedicationRequest?subject=Patient/p1", True),
        ("GET", "/fhir/MedicationRequest?patient=p2", False),
        ("GET", "/fhir/MedicationRequest?patient=p1,p2", True),  # restricted to p1
        ("GET", "/fhir/MedicationRequest?patient=p1&_revinclude=Provenance:target", True),
        ("GET", "/fhir/MedicationRequest/m1", True),  # confined by the handler (404 here)
        ("PUT", "/fhir/Patient/p1", False),  # patient/*.rs: no u
        ("GET", "/fhir/MedicationRequest/_history", False),  # type history cannot be confined
        ("GET", "/fhir/Patient/p1/$medication-history", True),
        ("GET", "/fhir/Patient/p2/$medication-history", False),
    ],
)
def test_patient_scopes_confined_to_the_patient_in_context(api, method: str, path: str, allowed: bool) -> None:
    token = hs256("patient/*.rs launch/patient", patient="p1")
    response = api.open(path, method=method, headers=bearer(token))
    if allowed:
        assert response.status_code not in (401, 403), response.get_data(as_text=True)
    else:
        assert response.status_code == 403


def test_patient_scope_refusal_explains_itself(api) -> None:
    response = api.get("/fhir/MedicationRequest/_history", headers=bearer(hs256("patient/*.rs", patient="p1")))
    assert outcome(response)["issue"][0]["diagnostics"] == (
        "history-type on MedicationRequest needs the scope system/MedicationRequest.r (or user/MedicationRequest.r); "
        "patient/ scopes cover only Patient/p1's compartment, and history-type on MedicationRequest cannot be confined to it"
    )
    without_patient = api.get("/fhir/Patient/p1", headers=bearer(hs256("patient/*.rs")))
    assert outcome(without_patient)["issue"][0]["diagnostics"].endswith("the token's patient/ scopes have no patient in context")


def test_patient_from_fhir_context() -> None:
    client = Client.from_claims({"sub": "s", "scope": "patient/Patient.r", "fhirContext": [{"reference": "Patient/p9"}]})
    assert client.patient == "p9"
    authorize(client, [Need("Patient", "r", "read", patient="p9")])
    with pytest.raises(Forbidden):
        authorize(client, [Need("Patient", "r", "read", patient="p8")])


# --- the caller ---------------------------------------------------------------------------------


def test_current_client_carries_identity_and_purpose_of_use(api) -> None:
    token = hs256("system/Patient.r openid", azp="ignored", purpose_of_use=[{"system": "x", "code": "TREAT"}, "HPAYMT"])
    with api:
        api.get("/fhir/Patient/p1", headers=bearer(token))
        client = current_client()
    assert client.client_id == "app-1"
    assert client.subject == "app-1"
    assert client.scopes == ("system/Patient.r", "openid")
    assert client.grants == (Grant("system", "Patient", "r"),)
    assert client.purpose_of_use == ("TREAT", "HPAYMT")
    assert client.authenticated


def test_current_client_when_auth_is_off(client) -> None:
    with client:
        client.get("/healthz")
        assert current_client() is auth.DEVELOPMENT_CLIENT


def test_scp_claim_list_is_read() -> None:
    assert Client.from_claims({"scp": ["system/Patient.rs"], "azp": "c2"}).grants == (Grant("system", "Patient", "rs"),)


@pytest.mark.parametrize(
    ("scope", "grant"),
    [
        ("system/MedicationRequest.rs", Grant("system", "MedicationRequest", "rs")),
        ("system/*.cruds", Grant("system", "*", "cruds")),
        ("patient/Observation.r", Grant("patient", "Observation", "r")),
        ("user/Patient.read", Grant("user", "Patient", "rs")),
        ("user/Patient.write", Grant("user", "Patient", "cud")),
        ("user/*.*", Grant("user", "*", "cruds")),
        ("system/Patient.", None),
        ("system/Patient.rx", None),
        ("system/patient.r", None),
        ("launch", None),
    ],
)
def test_parse_scope(scope: str, grant: Grant | None) -> None:
    assert parse_scope(scope) == grant


def test_operation_reads_cover_what_medication_history_returns() -> None:
    needs = classify("GET", "/fhir/Patient/p1/$medication-history", [], {}, dict)
    assert {(n.resource_type, n.permissions) for n in needs} == set(OPERATION_READS["medication-history"])
    assert all(n.patient == "p1" for n in needs)


# --- key sources --------------------------------------------------------------------------------


def _rsa_jwks(tmp_path, kid: str = "k1") -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": kid, "use": "sig"}]}))
    return private, str(path)


def _signed(private: Any, alg: str, kid: str | None, scope: str = "system/*.rs", **claims: Any) -> str:
    now = int(time.time())
    headers = {"kid": kid} if kid else {}
    return jwt.encode({"client_id": "rsa-app", "scope": scope, "exp": now + 60, **claims}, private, algorithm=alg, headers=headers)


def test_rsa_key_set_file(make_app, tmp_path) -> None:
    private, path = _rsa_jwks(tmp_path)
    api = make_app(AUTH="on", JWKS_FILE=path).test_client()
    for alg in ("RS256", "RS384"):
        with api:
            response = api.get("/fhir/Patient/p1", headers=bearer(_signed(private, alg, "k1")))
            assert response.status_code not in (401, 403)
            assert current_client().client_id == "rsa-app"
    other, _ = _rsa_jwks(tmp_path / "..", "k1")
    forged = api.get("/fhir/Patient/p1", headers=bearer(_signed(other, "RS256", "k1")))
    assert forged.status_code == 401
    assert outcome(forged)["issue"][0]["diagnostics"] == "the token's signature does not verify"
    unknown = api.get("/fhir/Patient/p1", headers=bearer(_signed(private, "RS256", "k2")))
    assert outcome(unknown)["issue"][0]["diagnostics"] == "no trusted RS256 key with kid 'k2'"
    # an HS256 token cannot ride on the RSA keys (no secret configured): no algorithm confusion
    hs = api.get("/fhir/Patient/p1", headers=bearer(hs256()))
    assert outcome(hs)["issue"][0]["diagnostics"] == "HS256 tokens are not accepted here"


def test_ec_key_without_kid(tmp_path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public]}))
    verifier = TokenVerifier({"JWKS_FILE": str(path)})
    assert verifier.verify(_signed(private, "ES256", None))["client_id"] == "rsa-app"
    with pytest.raises(Unauthorized, match="no trusted ES384 key fits the token"):
        verifier.verify(_signed(ec.generate_private_key(ec.SECP384R1()), "ES384", None))


def test_jwks_url_is_cached_refetched_on_unknown_kid_and_rate_limited(tmp_path) -> None:
    first, path1 = _rsa_jwks(tmp_path / "..", "k1")
    second, path2 = _rsa_jwks(tmp_path, "k2")
    served = {"jwks": json.loads(open(path1).read())}
    fetches: list[str] = []
    now = [1000.0]

    def fetch(url: str) -> Any:
        fetches.append(url)
        return served["jwks"]

    verifier = TokenVerifier({"JWKS_URL": "https://idp/jwks"}, fetch=fetch, clock=lambda: now[0])
    verifier.verify(_signed(first, "RS256", "k1"))
    verifier.verify(_signed(first, "RS256", "k1"))
    assert len(fetches) == 1  # cached
    served["jwks"] = json.loads(open(path2).read())  # the issuer rotates its key
    with pytest.raises(Unauthorized):
        verifier.verify(_signed(second, "RS256", "k2"))  # too soon after the first fetch to refetch
    assert len(fetches) == 1
    now[0] += auth.JWKS_MIN_REFETCH + 1
    assert verifier.verify(_signed(second, "RS256", "k2"))["scope"] == "system/*.rs"
    assert len(fetches) == 2
    with pytest.raises(Unauthorized):
        verifier.verify(_signed(second, "RS256", "k3"))  # unknown kid again: rate-limited, no fetch
    assert len(fetches) == 2


def test_jwks_url_unreachable_is_503_not_401(make_app) -> None:
    def down(url: str) -> Any:
        raise OSError("connection refused")

    verifier = TokenVerifier({"JWKS_URL": "https://idp/jwks"}, fetch=down)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(KeysUnavailable) as caught:
        verifier.verify(_signed(private, "RS256", "k1"))
    assert caught.value.status == 503


def test_jwks_url_fetched_with_requests(tmp_path) -> None:
    responses = pytest.importorskip("responses")
    private, path = _rsa_jwks(tmp_path)
    with responses.RequestsMock() as mock:
        mock.get("https://idp.example/jwks", body=open(path).read(), content_type="application/json")
        verifier = TokenVerifier({"JWKS_URL": "https://idp.example/jwks"})
        assert verifier.verify(_signed(private, "RS256", "k1"))["client_id"] == "rsa-app"


def test_auth_on_without_keys_is_a_configuration_error(make_app) -> None:
    with pytest.raises(ConfigError, match="no key is configured"):
        make_app(AUTH="on")


def test_bad_jwks_file_is_a_configuration_error(make_app, tmp_path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="holds no usable signing key"):
        make_app(AUTH="on", JWKS_FILE=str(path))


def test_auth_off_is_logged_loudly(make_app, caplog) -> None:
    with caplog.at_level("WARNING", logger="iop_fhir.api.auth"):
        make_app(AUTH="off")
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)


def test_token_is_checked_before_a_body_is_read(api) -> None:
    response = api.post("/fhir", data=b"{not json", content_type="application/fhir+json")
    assert response.status_code == 401


def test_verified_tokens_are_remembered_until_they_expire(monkeypatch) -> None:
    now = [time.time()]
    verifier = TokenVerifier({"JWT_SECRET": SECRET}, clock=lambda: now[0])
    calls = []
    original = verifier.verify
    monkeypatch.setattr(verifier, "verify", lambda token: calls.append(token) or original(token))
    token = hs256(exp=int(now[0]) + 60)
    first = verifier.client(token)
    assert verifier.client(token) is first
    assert len(calls) == 1
    now[0] += 60 + auth.LEEWAY + 1  # past exp (and the leeway): verified again
    verifier.client(token)
    assert len(calls) == 2
    with pytest.raises(Unauthorized):
        verifier.client("not-a-jwt")
