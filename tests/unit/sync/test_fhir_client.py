"""The FHIR REST connector against canned answers: requests as sent, and every failure classified."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
from hypothesis import given
from hypothesis import strategies as st

from iop_fhir import __version__
from iop_fhir.errors import PermanentDeliveryError, TransientDeliveryError
from iop_fhir.formats import fhir_json, fhir_xml
from iop_fhir.sync.destinations import Destination
from iop_fhir.sync.fhir_client import FhirClient, retry_after_seconds

BASE = "http://ehr.example:8090/fhir"
EHR = Destination(name="ehr", kind="fhir", base_url=BASE, connect_timeout=2.5, read_timeout=12.0)
NOW = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
PATIENT = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "https://iop.example/mrn", "value": "1"}]}
TRANSACTION = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:0d5c6f3e-8a34-4f1e-9a57-0b7c2a9d1e11",
            "resource": {k: v for k, v in PATIENT.items() if k != "id"},
            "request": {"method": "PUT", "url": "Patient?identifier=https://iop.example/mrn|1"},
        }
    ],
}
RESPONSE = {
    "resourceType": "Bundle",
    "type": "transaction-response",
    "entry": [{"response": {"status": "201 Created", "location": "Patient/9/_history/1"}}],
}


def outcome(diagnostics: str) -> dict:
    issue = {"severity": "error", "code": "invalid", "diagnostics": diagnostics, "expression": ["Patient.birthDate"]}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def searchset(*resources: dict, next_url: str | None = None, included: tuple[dict, ...] = ()) -> dict:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in included]
    links = [{"relation": "self", "url": "ignored"}] + ([{"relation": "next", "url": next_url}] if next_url else [])
    return {"resourceType": "Bundle", "type": "searchset", "link": links, **({"entry": entries} if entries else {})}


@pytest.fixture
def client() -> FhirClient:
    with FhirClient(EHR) as opened:
        yield opened


# --- what is sent ------------------------------------------------------------------------------


@responses.activate
def test_a_transaction_is_posted_as_fhir_json_with_timeouts_and_answers_the_response_bundle(client: FhirClient) -> None:
    responses.post(BASE, json=RESPONSE, content_type="application/fhir+json")
    assert client.transaction(TRANSACTION) == RESPONSE
    (call,) = responses.calls
    sent = call.request
    assert sent.url == BASE and sent.method == "POST"
    assert fhir_json.loads(sent.body) == TRANSACTION
    assert sent.headers["Content-Type"] == sent.headers["Accept"] == "application/fhir+json"
    assert sent.headers["User-Agent"] == f"iop-fhir/{__version__}"
    assert sent.headers["Prefer"] == "return=minimal"
    assert "Authorization" not in sent.headers
    assert sent.req_kwargs["timeout"] == (2.5, 12.0)


@responses.activate
def test_an_xml_destination_posts_and_reads_fhir_xml() -> None:
    responses.post(BASE, body=fhir_xml.to_xml(RESPONSE), content_type="application/fhir+xml;charset=utf-8")
    with FhirClient(Destination(name="ehr", kind="fhir", base_url=BASE, format="xml")) as client:
        assert client.transaction(TRANSACTION) == RESPONSE
    sent = responses.calls[0].request
    assert sent.headers["Content-Type"] == sent.headers["Accept"] == "application/fhir+xml"
    assert fhir_xml.from_xml(sent.body) == TRANSACTION


@responses.activate
def test_bearer_auth_sends_the_configured_token() -> None:
    responses.get(f"{BASE}/Patient/p1", json=PATIENT)
    with FhirClient(Destination(name="ehr", kind="fhir", base_url=BASE, auth="bearer", token="s3cret")) as client:
        client.read("Patient/p1")
    assert responses.calls[0].request.headers["Authorization"] == "Bearer s3cret"


def test_the_session_pools_connections_and_leaves_retrying_to_the_worker(client: FhirClient) -> None:
    adapter = client.session.get_adapter(BASE)
    assert adapter._pool_maxsize >= 8  # threads of one worker share the client
    assert adapter.max_retries.total == 0


def test_a_session_passed_in_stays_the_callers() -> None:
    session = requests.Session()
    closed: list[bool] = []
    session.close = lambda: closed.append(True)  # type: ignore[method-assign]
    FhirClient(EHR, session=session).close()
    assert closed == []


# --- how failures are classified -----------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
@responses.activate
def test_statuses_that_may_pass_are_transient(client: FhirClient, status: int) -> None:
    responses.post(BASE, status=status, json=outcome("busy"))
    with pytest.raises(TransientDeliveryError) as failed:
        client.transaction(TRANSACTION)
    assert failed.value.http_status == status and failed.value.retry_after is None
    assert failed.value.message.startswith(f"ehr: POST {BASE} answered {status}")
    assert "busy" in failed.value.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 412, 422, 501])
@responses.activate
def test_other_statuses_are_permanent_with_the_outcome_diagnostics(client: FhirClient, status: int) -> None:
    responses.post(BASE, status=status, json=outcome("birthDate is in the future"))
    with pytest.raises(PermanentDeliveryError) as failed:
        client.transaction(TRANSACTION)
    assert failed.value.http_status == status
    assert failed.value.message.startswith(f"ehr: POST {BASE} answered {status}")
    assert failed.value.message.endswith("birthDate is in the future (at Patient.birthDate)")


@responses.activate
def test_an_xml_outcome_is_read_too(client: FhirClient) -> None:
    responses.post(BASE, status=422, body=fhir_xml.to_xml(outcome("bad code")), content_type="application/fhir+xml")
    with pytest.raises(PermanentDeliveryError, match="bad code"):
        client.transaction(TRANSACTION)


@responses.activate
def test_a_body_that_is_no_outcome_is_quoted_up_to_300_characters(client: FhirClient) -> None:
    responses.post(BASE, status=400, body="x" * 299 + "yz" + "!" * 100, content_type="text/plain")
    with pytest.raises(PermanentDeliveryError) as failed:
        client.transaction(TRANSACTION)
    assert failed.value.message.endswith(": " + "x" * 299 + "y")


@pytest.mark.parametrize(
    "error",
    [requests.ConnectionError("refused"), requests.ConnectTimeout("connect timed out"), requests.ReadTimeout("read timed out")],
    ids=["connection", "connect-timeout", "read-timeout"],
)
@responses.activate
def test_no_answer_is_transient(client: FhirClient, error: Exception) -> None:
    responses.get(f"{BASE}/Patient/p1", body=error)
    with pytest.raises(TransientDeliveryError) as failed:
        client.read("Patient/p1")
    assert failed.value.http_status is None and failed.value.retry_after is None
    assert failed.value.message.startswith(f"ehr: GET {BASE}/Patient/p1: no answer: {type(error).__name__}")


@responses.activate
def test_retry_after_in_seconds_and_as_an_http_date_measured_by_the_servers_clock(client: FhirClient) -> None:
    server_time = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)  # far from our clock: skew must not matter
    responses.post(BASE, status=429, headers={"Retry-After": "17"})
    responses.post(
        BASE,
        status=503,
        headers={
            "Retry-After": format_datetime(server_time + timedelta(seconds=90), usegmt=True),
            "Date": format_datetime(server_time, usegmt=True),
        },
    )
    with pytest.raises(TransientDeliveryError) as limited:
        client.transaction(TRANSACTION)
    assert (limited.value.http_status, limited.value.retry_after) == (429, 17.0)
    with pytest.raises(TransientDeliveryError) as down:
        client.transaction(TRANSACTION)
    assert (down.value.http_status, down.value.retry_after) == (503, 90.0)


@responses.activate
def test_a_redirect_is_not_followed(client: FhirClient) -> None:
    responses.post(BASE, status=302, headers={"Location": "https://elsewhere.example/fhir"})
    with pytest.raises(PermanentDeliveryError, match="redirected to https://elsewhere.example/fhir") as failed:
        client.transaction(TRANSACTION)
    assert failed.value.http_status == 302 and len(responses.calls) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"<html>gateway</html>", "text/html", "with no FHIR resource"),
        (b"", "application/fhir+json", "the body is empty"),
        (b"{not json", "application/fhir+json", "with no FHIR resource"),
        (fhir_json.dumps(outcome("fine")), "application/fhir+json", "with a OperationOutcome, not a transaction-response Bundle"),
        (
            fhir_json.dumps({"resourceType": "Bundle", "type": "batch-response"}),
            "application/json",
            "with a batch-response, not a transaction-response Bundle",
        ),
    ],
)
@responses.activate
def test_a_2xx_without_the_expected_bundle_is_permanent(client: FhirClient, body: bytes, content_type: str, message: str) -> None:
    responses.post(BASE, status=200, body=body, content_type=content_type)
    with pytest.raises(PermanentDeliveryError, match=message) as failed:
        client.transaction(TRANSACTION)
    assert failed.value.http_status == 200 and failed.value.message.startswith(f"ehr: POST {BASE} answered 200")


# --- search and read ---------------------------------------------------------------------------


@responses.activate
def test_search_follows_relative_and_absolute_next_links_and_yields_every_resource(client: FhirClient) -> None:
    medication = {"resourceType": "Medication", "id": "m1"}
    first = [("patient", "Patient/p1"), ("_lastUpdated", "gt2026-01-01T00:00:00Z"), ("code", "http://loinc.org|44249-1")]
    responses.get(f"{BASE}/Observation", json=searchset({"resourceType": "Observation", "id": "o1"}, next_url="Observation?_cursor=2"))
    second = searchset({"resourceType": "Observation", "id": "o2"}, included=(medication,), next_url=f"{BASE}/Observation?_cursor=3")
    responses.get(f"{BASE}/Observation?_cursor=2", json=second)
    responses.get(f"{BASE}/Observation?_cursor=3", json=searchset())
    found = list(client.search("Observation", first))
    assert [(r["resourceType"], r["id"]) for r in found] == [("Observation", "o1"), ("Observation", "o2"), ("Medication", "m1")]
    assert parse_qsl(urlsplit(responses.calls[0].request.url).query) == first
    assert [urlsplit(c.request.url).query for c in responses.calls[1:]] == ["_cursor=2", "_cursor=3"]


@pytest.mark.parametrize(
    "next_url",
    [
        "http://evil.example:8090/fhir/Observation?page=2",
        "https://ehr.example:8090/fhir/Observation?page=2",
        "http://ehr.example:9999/fhir/Observation?page=2",
        "//evil.example/fhir/Observation",
    ],
    ids=["host", "scheme", "port", "scheme-relative"],
)
@responses.activate
def test_search_refuses_a_next_link_off_the_server(client: FhirClient, next_url: str) -> None:
    responses.get(f"{BASE}/Observation", json=searchset({"resourceType": "Observation", "id": "o1"}, next_url=next_url))
    results = client.search("Observation", [])
    assert next(results)["id"] == "o1"
    with pytest.raises(PermanentDeliveryError, match=re.escape(f"the next link {next_url} leaves {BASE}; not followed")):
        next(results)
    assert len(responses.calls) == 1


@responses.activate
def test_a_next_link_on_the_default_port_spelt_out_is_the_same_server() -> None:
    base = "https://ehr.example/fhir"
    responses.get(f"{base}/Condition", json=searchset(next_url="https://EHR.example:443/fhir/Condition?p=2"))
    responses.get("https://ehr.example:443/fhir/Condition?p=2", json=searchset({"resourceType": "Condition", "id": "c1"}))
    with FhirClient(Destination(name="ehr", kind="fhir", base_url=base)) as client:
        assert [r["id"] for r in client.search("Condition", [])] == ["c1"]


@responses.activate
def test_a_next_link_back_to_a_page_already_read_stops_the_search(client: FhirClient) -> None:
    responses.get(f"{BASE}/Condition", json=searchset(next_url=f"{BASE}/Condition?p=2"))
    responses.get(f"{BASE}/Condition?p=2", json=searchset(next_url=f"{BASE}/Condition"))
    with pytest.raises(PermanentDeliveryError, match="leads back to a page already read"):
        list(client.search("Condition", []))


@responses.activate
def test_a_search_answered_with_another_bundle_type_is_permanent(client: FhirClient) -> None:
    responses.get(f"{BASE}/Condition", json={"resourceType": "Bundle", "type": "collection"})
    with pytest.raises(PermanentDeliveryError, match="not a searchset Bundle"):
        list(client.search("Condition", []))


@responses.activate
def test_search_failures_are_classified_like_any_request(client: FhirClient) -> None:
    responses.get(f"{BASE}/Condition", status=429, headers={"Retry-After": "3"})
    with pytest.raises(TransientDeliveryError) as failed:
        list(client.search("Condition", [("patient", "Patient/p1")]))
    assert failed.value.retry_after == 3.0
    assert f"ehr: GET {BASE}/Condition?patient=Patient%2Fp1 answered 429" in failed.value.message


@responses.activate
def test_read_gets_a_resource_by_reference_version_or_url_on_the_server(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/p1", json=PATIENT)
    responses.get(f"{BASE}/Patient/p1/_history/2", json=PATIENT)
    assert client.read("Patient/p1") == PATIENT
    assert client.read("Patient/p1/_history/2") == PATIENT
    assert client.read(f"{BASE}/Patient/p1") == PATIENT


@pytest.mark.parametrize(
    "reference", ["#contained", "urn:uuid:0d5c6f3e-8a34-4f1e-9a57-0b7c2a9d1e11", "p1", "https://other.example/fhir/Patient/p1"]
)
def test_read_refuses_what_is_no_reference_on_this_server(client: FhirClient, reference: str) -> None:
    with pytest.raises(PermanentDeliveryError, match="not a Type/id reference"):
        client.read(reference)


@responses.activate
def test_read_of_a_missing_resource_or_another_type_is_permanent(client: FhirClient) -> None:
    responses.get(f"{BASE}/Patient/gone", status=404, json=outcome("Patient/gone is not known"))
    responses.get(f"{BASE}/Patient/odd", json={"resourceType": "Practitioner", "id": "odd"})
    with pytest.raises(PermanentDeliveryError) as missing:
        client.read("Patient/gone")
    assert missing.value.http_status == 404
    with pytest.raises(PermanentDeliveryError, match="answered a Practitioner, not the Patient asked for"):
        client.read("Patient/odd")


# --- Retry-After -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        (" 120 ", 120.0),
        ("Thu, 15 Jan 2026 09:01:30 GMT", 90.0),
        ("Thursday, 15-Jan-26 09:00:10 GMT", 10.0),  # RFC 850, still to be accepted
        ("Thu Jan 15 09:00:05 2026", 5.0),  # asctime
        ("Thu, 15 Jan 2026 08:00:00 GMT", 0.0),  # in the past: now
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, NOW) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_delta_seconds_are_taken_as_they_are(delay: int) -> None:
    assert retry_after_seconds(str(delay), NOW) == delay


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)))
def test_an_http_date_is_its_distance_from_now_to_the_second(moment: datetime) -> None:
    expected = max((moment.replace(microsecond=0) - NOW).total_seconds(), 0.0)
    assert retry_after_seconds(format_datetime(moment, usegmt=True), NOW) == expected
