"""What a caller cannot do to the service's operations: stall hook answers through feedback or
the store, inflate /metrics, or pass unlogged; and what `make run` turns on."""
from __future__ import annotations

import os
import sqlite3
import subprocess

import orjson
import requests

from service.config import PROJECT_ROOT
from service.store import Store
from tests.conftest import make_app
from tests.integration.test_gunicorn import served  # noqa: F401 - the gunicorn fixture
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"
NAME = "esrd-dialysis-high-product.json"


def feedback(n: int) -> dict:
    return {"feedback": [
        {"card": f"card-{i}", "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:00:00Z"} for i in range(n)
    ]}


# --- feedback and the store ---------------------------------------------------------------------

def test_a_feedback_post_over_100_items_is_400_too_many_items_and_stores_nothing(client, app):
    response = client.post(URL + "/feedback", json=feedback(101))
    assert response.status_code == 400
    assert response.json["error"]["code"] == "too_many_items" and response.json["error"]["field"] == "feedback"
    assert "at most 100" in response.json["error"]["message"]
    assert len(response.get_data()) < 500  # nothing of the post is echoed back
    assert app.extensions["calcinosis"].store.report() == []


def test_a_feedback_post_of_100_items_is_stored(client):
    response = client.post(URL + "/feedback", json=feedback(100))
    assert response.status_code == 200 and response.json["stored"] == 100


class LockedStore(Store):
    """A store whose card table is locked by someone else."""

    def record_cards(self, *args, **kwargs):
        raise sqlite3.OperationalError("database is locked")


def test_a_failure_to_record_issued_cards_is_logged_and_counted_and_the_cards_are_answered(tmp_path, log_lines):
    app = make_app(tmp_path, STORE=LockedStore.from_url(f"sqlite:///{tmp_path / 'locked.db'}"))
    before = _metric(app, "cds_card_record_failures_total")
    response = app.test_client().post(URL, json=request_with_prefetch(NAME))
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]
    assert _metric(app, "cds_card_record_failures_total") == before + 1
    (line,) = [line for line in log_lines() if line.get("event") == "cards_not_recorded"]
    assert line["level"] == "error" and line["error_type"] == "OperationalError" and line["cards"] == 1


def _metric(app, name: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


# --- metrics cannot be inflated from outside ----------------------------------------------------------

def test_posts_to_unknown_service_ids_share_one_metrics_label(client):
    def unknown_series() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        assert not any(f'service="x{n}"' in text for n in range(50))
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("cds_requests_total{") and 'service="unknown"' in line
        }

    before = unknown_series()
    for n in range(50):
        assert client.post(f"/cds-services/x{n}", json={}).status_code == 404
        client.post(f"/cds-services/x{n}/feedback/extra", json={})
    after = unknown_series()
    # The metrics registry is per process, so other tests may have counted here before: compare growth.
    grown = {series: after[series] - before.get(series, 0.0) for series in after if after[series] != before.get(series)}
    assert grown == {
        'cds_requests_total{endpoint="invoke",service="unknown",status="404"}': 50.0,
        'cds_requests_total{endpoint="unmatched",service="unknown",status="404"}': 50.0,
    }


# --- the access log -------------------------------------------------------------------------------

def test_every_request_leaves_one_access_line_without_query_body_token_or_patient(client, log_lines):
    request = request_with_prefetch(NAME)
    request["context"]["patientId"] = request["prefetch"]["patient"]["id"] = "patient-QX77-secret"
    client.post(URL + "?patient=patient-QX77-secret", json=request, headers={"Authorization": "Bearer opaque-SECRET-token"})
    client.get("/cds-services?x=query-SECRET")
    client.options(URL, headers={"Origin": "https://127.0.0.1", "Access-Control-Request-Method": "POST"})
    client.post("/cds-services/nope", json={})
    lines = [line for line in log_lines() if line.get("event") == "access"]
    assert [(l["method"], l["route"], l["service"], l["status"]) for l in lines] == [
        ("POST", "/cds-services/<service_id>", "calcinosis-risk", 200),
        ("GET", "/cds-services", "-", 200),
        ("OPTIONS", "/cds-services/<service_id>", "calcinosis-risk", 200),
        ("POST", "/cds-services/<service_id>", "unknown", 404),
    ]
    assert all(isinstance(l["ms"], float) and l["client"] == "127.0.0.1" for l in lines)
    text = orjson.dumps(lines).decode()
    for secret in ("patient-QX77-secret", "SECRET", "query"):
        assert secret not in text


def test_the_access_log_can_be_switched_off(tmp_path, log_lines):
    make_app(tmp_path, ACCESS_LOG=False).test_client().get("/cds-services")
    assert not [line for line in log_lines() if line.get("event") == "access"]


def test_gunicorn_writes_the_access_log_too(served, tmp_path):  # noqa: F811 - the fixture imported above
    _, base, _ = served
    requests.get(base + "/cds-services?patient=query-SECRET", timeout=5)
    requests.post(base + "/cds-services/no-such-service", json={}, timeout=5)
    logged = [orjson.loads(line) for line in (tmp_path / "gunicorn.log").read_bytes().splitlines() if line.startswith(b"{")]
    access = [(l["method"], l["route"], l["status"]) for l in logged if l.get("event") == "access"]
    assert ("GET", "/cds-services", 200) in access and ("POST", "/cds-services/<service_id>", 404) in access
    assert b"query-SECRET" not in (tmp_path / "gunicorn.log").read_bytes()


# --- make run -------------------------------------------------------------------------------------

def make_run(**environment) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")} | environment
    return subprocess.run(["make", "-n", "run"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=30, check=True).stdout


def test_make_run_disables_auth_only_while_no_trusted_issuers_are_set():
    assert "CDS_AUTH=${CDS_AUTH:-disabled}" in make_run()
    assert "CDS_AUTH" not in make_run(CDS_TRUSTED_ISSUERS="issuers.yaml")
