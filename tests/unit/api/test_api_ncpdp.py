"""``POST /ncpdp`` and ``/admin/ncpdp``: pharmacies' SCRIPT messages over HTTP, answered in SCRIPT,
kept in the message store, replayed; the example record's client as the patient."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from iop_fhir.api import STORE_KEY
from iop_fhir.config import ConfigError
from iop_fhir.formats import ncpdp
from iop_fhir.store import Store

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "fixtures" / "ncpdp"
RECORD = json.loads((ROOT / "fixtures" / "iop" / "example-dual-diagnosis.json").read_text(encoding="utf-8"))
NOW = dt.datetime(2026, 3, 5, 15, 0, tzinfo=dt.UTC)  # a week after the example client's discharge (02-27)
XML = {"Content-Type": "application/xml"}
SECRET = "a-development-secret-of-32-bytes-or-more"
EHR = {"name": "ehr", "kind": "fhir", "base_url": "http://127.0.0.1:9/fhir"}


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def store_of(app: Flask) -> Store:
    return app.extensions[STORE_KEY]


def gateway(make_app, **settings: Any) -> tuple[Flask, FlaskClient]:
    """A gateway holding the example record, its clock pinned to NOW, an EHR destination in scope."""
    app = make_app(destination=[EHR], **settings)
    store_of(app).clock = lambda: NOW
    client = app.test_client()
    headers = bearer("system/*.cruds") if settings.get("AUTH") == "on" else {}
    assert client.post("/iop/records", json=RECORD, headers=headers).status_code == 201
    return app, client


def bearer(scope: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"client_id": "pharmacy", "scope": scope, "iat": now, "exp": now + 300}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def resources(client: FlaskClient, query: str) -> list[dict[str, Any]]:
    bundle = client.get(f"/fhir/{query}").get_json()
    return [e["resource"] for e in bundle.get("entry", [])]


def order_rx3(client: FlaskClient) -> dict[str, Any]:
    (found,) = [r for r in resources(client, "MedicationRequest?identifier=ep-2026-0042/rx-3") if r["intent"] == "order"]
    return found


def post(client: FlaskClient, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, ncpdp.Message]:
    response = client.post("/ncpdp", data=body, headers={**XML, **(headers or {})})
    assert response.content_type == "application/xml"
    return response.status_code, ncpdp.parse(response.data)


# --- RxFill, end to end ---------------------------------------------------------------------------------


def test_a_fill_becomes_a_dispense_a_pdc_observation_and_an_overdue_flag(make_app) -> None:
    app, client = gateway(make_app)
    status, answer = post(client, fixture("rxfill-dispensed.xml"))
    assert status == 200 and answer.kind == "Status" and answer.header.relates_to_message_id == "ph-fill-0001"
    order = order_rx3(client)
    patient = order["subject"]["reference"]
    (dispense,) = resources(client, f"MedicationDispense?patient={patient}")
    assert dispense["authorizingPrescription"] == [{"reference": f"MedicationRequest/{order['id']}"}]
    assert dispense["whenHandedOver"] == "2026-01-06" and dispense["status"] == "completed"
    pdc = {o["identifier"][0]["value"]: o for o in resources(client, f"Observation?patient={patient}&code=pdc")}
    mine = pdc[f"{order['id']}/2026-01-06/2026-03-05"]  # first fill to today
    assert mine["valueQuantity"] == {"value": 11.9, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}  # 7 of 59 days
    (flag,) = resources(client, f"Flag?patient={patient}")
    # supply ran out after 01-12; discharged 02-27 with nothing dispensed since: overdue, active
    assert flag["status"] == "active" and flag["code"]["text"].startswith("MAT refill overdue: buprenorphine")
    queued = {(d.resource_type, d.resource_id) for d in store_of(app).outbox.list(destination="ehr", limit=10_000)}
    assert {("MedicationDispense", dispense["id"]), ("Observation", mine["id"]), ("Flag", flag["id"])} <= queued


@pytest.mark.parametrize(
    ("name", "status"),
    [("rxfill-partially-dispensed.xml", "in-progress"), ("rxfill-not-dispensed.xml", "declined"), ("rxfill-transferred.xml", "stopped")],
)
def test_every_fill_status_is_recorded(make_app, name: str, status: str) -> None:
    _app, client = gateway(make_app)
    code, answer = post(client, fixture(name))
    assert code == 200 and answer.kind == "Status"
    (dispense,) = resources(client, "MedicationDispense")
    assert dispense["status"] == status


def test_the_same_fill_twice_is_answered_identically_and_stored_once(make_app) -> None:
    app, client = gateway(make_app)
    first = client.post("/ncpdp", data=fixture("rxfill-dispensed.xml"), headers=XML)
    second = client.post("/ncpdp", data=fixture("rxfill-dispensed.xml"), headers={"Content-Type": "text/xml"})
    assert first.status_code == second.status_code == 200 and first.data == second.data
    assert len(resources(client, "MedicationDispense")) == 1
    assert [(m.direction, m.kind) for m in store_of(app).messages.list()] == [("in", "RxFill"), ("out", "Status")]


def test_a_fill_for_an_unknown_prescription_is_an_error_in_script(make_app) -> None:
    _app, client = gateway(make_app)
    body = fixture("rxfill-dispensed.xml").replace(b"ep-2026-0042/rx-3", b"ep-2026-0042/rx-99")
    status, answer = post(client, body)
    assert status == 200 and answer.kind == "Error" and answer.body.code == "900"
    assert "ep-2026-0042/rx-99" in answer.body.description
    assert resources(client, "MedicationDispense") == []


# --- the other transactions -------------------------------------------------------------------------------


def sent(app: Flask, name: str, kind: str, message_id: str, **about: str) -> int:
    """What the outbound channel would have recorded when it sent fixture ``name``."""
    return store_of(app).messages.record(direction="out", kind=kind, message_id=message_id, body=fixture(name), status="accepted", counterparty="main-street", **about)


def test_renewal_and_change_requests_become_tasks_for_the_prescriber(make_app) -> None:
    _app, client = gateway(make_app)
    for name in ("rxrenewal-request.xml", "rxchange-request.xml"):
        status, answer = post(client, fixture(name))
        assert status == 200 and answer.kind == "Status"
    order = order_rx3(client)
    tasks = [t for t in resources(client, "Task?status=requested") if t.get("focus") == {"reference": f"MedicationRequest/{order['id']}"}]
    assert sorted(t["identifier"][0]["value"] for t in tasks) == ["1434567/ph-change-0001", "1434567/ph-renew-0001"]


def test_a_denied_cancel_is_correlated_and_raises_a_task(make_app) -> None:
    app, client = gateway(make_app)
    order = order_rx3(client)
    cancel = sent(app, "cancelrx.xml", "CancelRx", "iopgw-cancel-0001", prescription=f"MedicationRequest/{order['id']}", patient_key=order["subject"]["reference"])
    status, answer = post(client, fixture("cancelrx-response.xml"))
    assert status == 200 and answer.kind == "Status"
    kept = store_of(app).messages.get(cancel)
    assert (kept.status, kept.detail) == ("denied", "Already dispensed; reason code AA")
    (task,) = [t for t in resources(client, "Task") if t.get("businessStatus", {}).get("text") == "Cancellation denied by the pharmacy"]
    assert "Already dispensed" in task["description"] and task["for"] == order["subject"]


def test_a_history_answering_our_request_is_stored_for_the_patient(make_app) -> None:
    app, client = gateway(make_app)
    patient = order_rx3(client)["subject"]["reference"]
    sent(app, "rxhistory-request.xml", "RxHistoryRequest", "iopgw-hist-0001", patient_key=patient)
    status, answer = post(client, fixture("rxhistory-response.xml"))
    assert status == 200 and answer.kind == "Status"
    history = resources(client, f"MedicationDispense?patient={patient}") + resources(client, f"MedicationStatement?patient={patient}")
    assert history and all(r["identifier"][0]["system"].endswith("/sid/pharmacy-fill") for r in history)
    keys = [r["identifier"][0]["value"] for r in history]
    assert len(keys) == len(set(keys))  # one fill reported by two sources is kept once


def test_acknowledgements_set_the_status_of_our_message(make_app) -> None:
    app, client = gateway(make_app)
    new_rx = sent(app, "newrx.xml", "NewRx", "iopgw-newrx-0001")
    status, answer = post(client, fixture("verify.xml"))
    assert status == 200 and answer.kind == "Status"
    assert store_of(app).messages.get(new_rx).status == "verified"
    status, answer = post(client, fixture("error.xml"))  # relates to a message we never sent
    assert status == 200 and answer.kind == "Status"
    assert store_of(app).messages.find("iopgw-err-0001", direction="in").status == "uncorrelated"


# --- what is refused ------------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<Message><Header><MessageID>&lol3;</MessageID></Header></Message>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE Message [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<Message><Header><MessageID>&x;</MessageID></Header><Body><Status><Code>000</Code></Status></Body></Message>"""
DEEP = b"<Message>" + b"<a>" * 100 + b"</a>" * 100 + b"</Message>"


def huge_but_allowed() -> bytes:
    """Over the 1 MiB a SCRIPT message may have, under the request limit."""
    return fixture("status.xml").replace(b"</Body>", b"<!--" + b"x" * (1024 * 1024) + b"--></Body>")


@pytest.mark.parametrize(
    "body",
    [
        b"<Message><Header>",
        BILLION_LAUGHS,
        XXE,
        DEEP,
        b"<Bundle xmlns='http://hl7.org/fhir'><type value='transaction'/></Bundle>",
        b"<Message xmlns='urn:other'/>",
        fixture("rxfill-dispensed.xml").replace(b"<MessageID>ph-fill-0001</MessageID>", b""),
        fixture("rxfill-dispensed.xml").replace(b"<Dispensed>", b"<Misplaced>").replace(b"</Dispensed>", b"</Misplaced>"),
        "__huge__",
    ],
    ids=["malformed", "billion-laughs", "external-entity", "too-deep", "fhir-bundle", "foreign-namespace", "no-message-id", "bad-fill-status", "over-1-mib"],
)
def test_hostile_or_unreadable_xml_is_a_400_script_error_and_only_the_rejected_record_is_kept(make_app, body: Any) -> None:
    app, client = gateway(make_app)
    body = huge_but_allowed() if body == "__huge__" else body
    before = store_of(app).history(count=0, total=True).total
    started = time.monotonic()
    status, answer = post(client, body)
    assert time.monotonic() - started < 5  # never a hang
    assert status == 400 and answer.kind == "Error" and answer.body.code == "900" and answer.body.description
    assert store_of(app).history(count=0, total=True).total == before  # no resource written
    (kept,) = store_of(app).messages.list()
    assert (kept.direction, kept.status, kept.kind) == ("in", "rejected", "unreadable")
    assert kept.body == body[: ncpdp.MAX_MESSAGE_BYTES] and kept.detail


def test_a_body_over_the_request_limit_is_a_413_script_error(make_app) -> None:
    app = make_app(MAX_BODY_BYTES=4096)
    client = app.test_client()
    status, answer = post(client, b"<Message>" + b" " * 5000 + b"</Message>")
    assert status == 413 and answer.kind == "Error"
    (kept,) = store_of(app).messages.list()
    assert kept.status == "rejected" and kept.body == b"" and "4096" in kept.detail


def test_other_content_types_are_refused_in_script(client: FlaskClient) -> None:
    response = client.post("/ncpdp", data=fixture("status.xml"), headers={"Content-Type": "application/json"})
    assert response.status_code == 415 and ncpdp.parse(response.data).kind == "Error"


# --- the message store under /admin -------------------------------------------------------------------------


def test_admin_lists_shows_and_replays_messages(make_app) -> None:
    app, client = gateway(make_app)
    missing = fixture("rxfill-dispensed.xml").replace(b"ep-2026-0042/rx-3", b"ep-2026-0042/rx-9")
    post(client, missing)
    post(client, b"junk")
    listed = client.get("/admin/ncpdp/messages").get_json()
    rows = listed["messages"]
    assert [(r["direction"], r["kind"], r["status"]) for r in rows] == [("in", "RxFill", "error"), ("out", "Error", "sent"), ("in", "unreadable", "rejected")]
    assert listed["next_after"] is None and all("body" not in r for r in rows)
    assert [r["id"] for r in client.get("/admin/ncpdp/messages?direction=in&limit=1").get_json()["messages"]] == [rows[0]["id"]]
    assert client.get(f"/admin/ncpdp/messages?after={rows[0]['id']}&kind=unreadable").get_json()["messages"] == [rows[2]]

    shown = client.get(f"/admin/ncpdp/messages/{rows[0]['id']}")
    assert shown.status_code == 200 and shown.content_type == "application/xml" and shown.data == missing
    assert shown.headers["X-Message-Kind"] == "RxFill"
    junk = client.get(f"/admin/ncpdp/messages/{rows[2]['id']}")
    assert junk.data == b"junk" and junk.content_type == "application/octet-stream" and "attachment" in junk.headers["Content-Disposition"]

    refused = client.post(f"/admin/ncpdp/messages/{rows[0]['id']}/replay")
    assert refused.status_code == 422 and refused.get_json()["resourceType"] == "OperationOutcome"
    # the prescription arrives under that number (say the record was corrected): replay applies the fill
    fixed = json.loads(json.dumps(RECORD).replace('"rx-3"', '"rx-9"'))
    assert client.put(f"/iop/records/{RECORD['id']}", json=fixed).status_code in (200, 201)
    replayed = client.post(f"/admin/ncpdp/messages/{rows[0]['id']}/replay")
    assert replayed.status_code == 200
    result = replayed.get_json()
    assert result["status"] == "processed" and result["kind"] == "RxFill" and any(w.startswith("MedicationDispense/") for w in result["written"])
    assert client.get("/admin/ncpdp/messages?status=processed").get_json()["messages"][0]["id"] == rows[0]["id"]

    outbound = client.post(f"/admin/ncpdp/messages/{rows[1]['id']}/replay")
    assert outbound.status_code == 409 and "sync requeue" in outbound.get_json()["issue"][0]["diagnostics"]
    assert client.post(f"/admin/ncpdp/messages/{rows[2]['id']}/replay").status_code == 409
    assert client.get("/admin/ncpdp/messages/9999").status_code == 404
    assert client.post("/admin/ncpdp/messages/9999/replay").status_code == 404


@pytest.mark.parametrize("query", ["direction=sideways", "limit=0", "limit=5000", "after=x", "colour=red"])
def test_admin_list_parameters_are_checked(client: FlaskClient, query: str) -> None:
    response = client.get(f"/admin/ncpdp/messages?{query}")
    assert response.status_code == 400 and response.get_json()["resourceType"] == "OperationOutcome"


# --- who may ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer not-a-jwt"}, 401),
        (bearer("system/Patient.rs"), 403),
        (bearer("system/MedicationDispense.rs"), 403),
        (bearer("system/MedicationDispense.c"), 200),
        (bearer("system/*.cruds"), 200),
    ],
    ids=["no-token", "bad-token", "other-type", "no-create", "dispense-create", "full"],
)
def test_a_pharmacy_needs_a_token_that_may_create_dispenses(make_app, headers: dict[str, str], status: int) -> None:
    app, client = gateway(make_app, AUTH="on", JWT_SECRET=SECRET)
    response = client.post("/ncpdp", data=fixture("rxfill-dispensed.xml"), headers={**XML, **headers})
    assert response.status_code == status
    assert len(store_of(app).messages.list()) == (2 if status == 200 else 0)  # refused before anything is read


@pytest.mark.parametrize(("scope", "status"), [(None, 401), ("system/MedicationDispense.c", 403), ("system/*.rs", 403), ("system/*.cruds", 200)])
def test_the_message_store_needs_full_access(make_app, scope: str | None, status: int) -> None:
    _app, client = gateway(make_app, AUTH="on", JWT_SECRET=SECRET)
    headers = bearer(scope) if scope else {}
    assert client.get("/admin/ncpdp/messages", headers=headers).status_code == status
    assert client.post("/admin/ncpdp/messages/1/replay", headers=headers).status_code == (404 if status == 200 else status)


def test_replies_carry_no_internal_detail(make_app) -> None:
    """The Error a pharmacy gets names the element, never a stack or a query."""
    _app, client = gateway(make_app)
    response = client.post("/ncpdp", data=b"<Message><Header><MessageID>m</MessageID></Header><Body/></Message>", headers=XML)
    assert response.status_code == 400
    text = response.data.decode()
    assert "/Message/Body" in text and not re.search(r"Traceback|sqlalchemy|\.py", text)


def test_a_bad_grace_setting_stops_the_gateway_at_start(make_app) -> None:
    with pytest.raises(ConfigError, match="MAT_REFILL_GRACE_DAYS"):
        make_app(MAT_REFILL_GRACE_DAYS=-2)
