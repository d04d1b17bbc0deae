"""SMART Backend Services: the signed client assertion, the token request, caching, failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iop_fhir.errors import PermanentDeliveryError, TransientDeliveryError
from iop_fhir.sync.destinations import Destination, SmartBackend
from iop_fhir.sync.fhir_client import FhirClient
from iop_fhir.sync.smart_backend import CLIENT_ASSERTION_TYPE, SmartBackendAuth, client_assertion

TOKEN_URL = "https://auth.example/token"
BASE = "https://ehr.example/fhir"
NOW = 1_800_000_000.0


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture
def config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> SmartBackend:
    path = tmp_path / "client.pem"
    path.write_bytes(pem(rsa_key))
    return SmartBackend(token_url=TOKEN_URL, client_id="iop-gateway", private_key=path, key_id="key-1", scope="system/*.rs")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def token_answer(token: str = "tok-1", expires_in: float = 300, **extra: object) -> dict:
    return {"access_token": token, "token_type": "bearer", "expires_in": expires_in, "scope": "system/*.rs", **extra}


def form(call: responses.Call) -> dict[str, str]:
    body = call.request.body
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {k: v[0] for k, v in parse_qs(text).items()}


# --- the assertion -----------------------------------------------------------------------------


def test_an_rs384_assertion_carries_the_smart_claims_and_verifies_with_the_public_key(
    config: SmartBackend, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = client_assertion(config, NOW)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS384", "typ": "JWT", "kid": "key-1"}
    claims = jwt.decode(
        token, rsa_key.public_key(), algorithms=["RS384"], audience=TOKEN_URL, options={"verify_exp": False, "verify_iat": False}
    )
    assert claims["iss"] == claims["sub"] == "iop-gateway"
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + 300
    assert claims["jti"] != jwt.decode(client_assertion(config, NOW), options={"verify_signature": False})["jti"]


def test_an_es384_assertion_verifies_with_the_ec_public_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(pem(ec_key))
    config = SmartBackend(token_url=TOKEN_URL, client_id="c", private_key=path, algorithm="ES384")
    token = client_assertion(config, time.time())
    assert jwt.get_unverified_header(token) == {"alg": "ES384", "typ": "JWT"}  # no kid configured, none sent
    claims = jwt.decode(token, ec_key.public_key(), algorithms=["ES384"], audience=TOKEN_URL)
    assert claims["sub"] == "c"


@pytest.mark.parametrize(
    ("algorithm", "make_key", "message"),
    [
        ("ES384", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "an RSA key, which cannot sign ES384"),
        ("RS384", lambda: ec.generate_private_key(ec.SECP384R1()), "an EC key, which cannot sign RS384"),
        ("ES384", lambda: ec.generate_private_key(ec.SECP256R1()), "curve secp256r1; ES384 signs with P-384"),
    ],
)
def test_a_key_of_the_wrong_kind_is_a_permanent_error(tmp_path: Path, algorithm: str, make_key, message: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(pem(make_key()))
    with pytest.raises(PermanentDeliveryError, match=message):
        client_assertion(SmartBackend(TOKEN_URL, "c", path, algorithm=algorithm), NOW)


def test_a_missing_or_malformed_key_file_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentDeliveryError, match="cannot be read"):
        client_assertion(SmartBackend(TOKEN_URL, "c", tmp_path / "absent.pem"), NOW)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(PermanentDeliveryError, match="not an unencrypted PEM private key"):
        client_assertion(SmartBackend(TOKEN_URL, "c", bad), NOW)


# --- the token ---------------------------------------------------------------------------------


@responses.activate
def test_the_token_request_is_a_client_credentials_grant_with_the_assertion(config: SmartBackend, rsa_key: rsa.RSAPrivateKey) -> None:
    responses.post(TOKEN_URL, json=token_answer())
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    assert auth.token() == "tok-1"
    sent = form(responses.calls[0])
    assert sent["grant_type"] == "client_credentials"
    assert sent["scope"] == "system/*.rs"
    assert sent["client_assertion_type"] == CLIENT_ASSERTION_TYPE == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    lenient = {"verify_exp": False, "verify_iat": False}  # signed at the injected clock's time, not now
    claims = jwt.decode(sent["client_assertion"], rsa_key.public_key(), algorithms=["RS384"], audience=TOKEN_URL, options=lenient)
    assert claims["iat"] == int(NOW)
    assert responses.calls[0].request.headers["Content-Type"] == "application/x-www-form-urlencoded"


@responses.activate
def test_the_token_is_cached_until_30_seconds_before_it_expires(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer("tok-1", 300))
    responses.post(TOKEN_URL, json=token_answer("tok-2", 300))
    clock = Clock()
    auth = SmartBackendAuth(config, requests.Session(), clock=clock)
    assert {auth.token() for _ in range(20)} == {"tok-1"}
    clock.now = NOW + 269.9
    assert auth.token() == "tok-1"
    assert len(responses.calls) == 1
    clock.now = NOW + 270
    assert auth.token() == "tok-2"
    assert len(responses.calls) == 2


@responses.activate
def test_a_token_shorter_than_the_margin_is_fetched_for_each_use(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer("short", 10))
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    auth.token()
    auth.token()
    assert len(responses.calls) == 2


@responses.activate
def test_invalidate_forgets_the_token(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer("tok-1"))
    responses.post(TOKEN_URL, json=token_answer("tok-2"))
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    assert auth.token() == "tok-1"
    auth.invalidate()
    assert auth.token() == "tok-2"


@responses.activate
def test_threads_share_one_token_fetch(config: SmartBackend) -> None:
    def slow(request: requests.PreparedRequest) -> tuple[int, dict, str]:
        time.sleep(0.05)  # long enough for every thread to be waiting on the fetch
        return 200, {"Content-Type": "application/json"}, '{"access_token": "shared", "expires_in": 300}'

    responses.add_callback(responses.POST, TOKEN_URL, callback=slow)
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(auth.token())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert got == ["shared"] * 8
    assert len(responses.calls) == 1


@responses.activate
def test_a_refused_client_is_a_permanent_error_with_the_oauth_error(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, status=400, json={"error": "invalid_client", "error_description": "unknown kid key-1"})
    responses.post(TOKEN_URL, status=401, json={"error": "invalid_client"})
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    with pytest.raises(PermanentDeliveryError, match="answered 400 Bad Request: invalid_client: unknown kid key-1") as refused:
        auth.token()
    assert refused.value.http_status == 400 and TOKEN_URL in refused.value.message
    with pytest.raises(PermanentDeliveryError, match="401 Unauthorized: invalid_client") as unauthorized:
        auth.token()
    assert unauthorized.value.http_status == 401


@responses.activate
def test_an_unavailable_token_endpoint_is_a_transient_error(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, status=503, body="down for maintenance", headers={"Retry-After": "120"})
    responses.post(TOKEN_URL, status=429, json={"error": "slow_down"})
    responses.post(TOKEN_URL, body=requests.ConnectionError("connection refused"))
    auth = SmartBackendAuth(config, requests.Session(), clock=Clock())
    with pytest.raises(TransientDeliveryError, match="503 Service Unavailable: down for maintenance") as down:
        auth.token()
    assert (down.value.http_status, down.value.retry_after) == (503, 120.0)
    with pytest.raises(TransientDeliveryError, match="429 Too Many Requests: slow_down"):
        auth.token()
    with pytest.raises(TransientDeliveryError, match="no answer: connection refused") as unreachable:
        auth.token()
    assert unreachable.value.http_status is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"token_type": "bearer", "expires_in": 300}, "no access_token"),
        ({"access_token": "", "expires_in": 300}, "no access_token"),
        ({"access_token": "t", "token_type": "DPoP"}, "token_type 'DPoP' is not supported"),
    ],
)
@responses.activate
def test_an_answer_without_a_usable_token_is_a_permanent_error(config: SmartBackend, answer: dict, message: str) -> None:
    responses.post(TOKEN_URL, json=answer)
    with pytest.raises(PermanentDeliveryError, match=message):
        SmartBackendAuth(config, requests.Session(), clock=Clock()).token()


@responses.activate
def test_a_non_json_answer_is_a_permanent_error(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, body="<html>login</html>", content_type="text/html")
    with pytest.raises(PermanentDeliveryError, match="no access_token"):
        SmartBackendAuth(config, requests.Session(), clock=Clock()).token()


@responses.activate
def test_without_expires_in_the_token_lives_the_smart_recommended_five_minutes(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json={"access_token": "t1"})
    responses.post(TOKEN_URL, json={"access_token": "t2"})
    clock = Clock()
    auth = SmartBackendAuth(config, requests.Session(), clock=clock)
    auth.token()
    clock.now = NOW + 269
    assert auth.token() == "t1"
    clock.now = NOW + 271
    assert auth.token() == "t2"


# --- through the FHIR client ---------------------------------------------------------------------


def smart_destination(config: SmartBackend) -> Destination:
    return Destination(name="ehr", kind="fhir", base_url=BASE, auth="smart-backend", smart=config)


@responses.activate
def test_fhir_requests_carry_the_token_and_one_token_serves_many_calls(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer("tok-1"))
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    with FhirClient(smart_destination(config)) as client:
        for _ in range(5):
            client.read("Patient/1")
    fhir_calls = [c for c in responses.calls if c.request.url.startswith(BASE)]
    assert len(fhir_calls) == 5 and len(responses.calls) == 6
    assert {c.request.headers["Authorization"] for c in fhir_calls} == {"Bearer tok-1"}


@responses.activate
def test_a_401_from_the_ehr_fetches_a_new_token_and_retries_once(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer("revoked"))
    responses.post(TOKEN_URL, json=token_answer("fresh"))
    refused = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
    responses.get(f"{BASE}/Patient/1", status=401, json=refused)
    responses.get(f"{BASE}/Patient/1", json={"resourceType": "Patient", "id": "1"})
    with FhirClient(smart_destination(config)) as client:
        assert client.read("Patient/1")["id"] == "1"
    fhir_calls = [c for c in responses.calls if c.request.url.startswith(BASE)]
    assert [c.request.headers["Authorization"] for c in fhir_calls] == ["Bearer revoked", "Bearer fresh"]


@responses.activate
def test_a_second_401_is_a_permanent_error(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, json=token_answer())
    issue = {"severity": "error", "code": "login", "diagnostics": "scope too narrow"}
    responses.get(f"{BASE}/Patient/1", status=401, json={"resourceType": "OperationOutcome", "issue": [issue]})
    with FhirClient(smart_destination(config)) as client, pytest.raises(PermanentDeliveryError, match="scope too narrow") as refused:
        client.read("Patient/1")
    assert refused.value.http_status == 401
    assert len([c for c in responses.calls if c.request.url.startswith(BASE)]) == 2


@responses.activate
def test_token_endpoint_failures_name_the_destination_and_the_request(config: SmartBackend) -> None:
    responses.post(TOKEN_URL, status=503, headers={"Retry-After": "7"})
    with FhirClient(smart_destination(config)) as client, pytest.raises(TransientDeliveryError) as down:
        client.read("Patient/1")
    assert down.value.message.startswith(f"ehr: GET {BASE}/Patient/1: token request POST {TOKEN_URL} answered 503")
    assert (down.value.http_status, down.value.retry_after) == (503, 7.0)
