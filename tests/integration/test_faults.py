"""When the EHR's FHIR server misbehaves: each fault has a defined answer, within the time budget, and a log line.

Policy (README "FHIR server fallback"): a key the server cannot supply is a 412 naming
the key and the reason; a next link that loops ends paging with the pages read.
"""
from __future__ import annotations

import http.server
import re
import threading
import time

import orjson
import pytest
import responses

from tests.conftest import make_app
from tests.fhir_server import searchset
from tests.requests_builder import FHIR_SERVER, request_without_prefetch, scenario

URL = "/cds-services/calcinosis-risk"
NAME = "esrd-dialysis-high-product.json"


def only_observations_fail(mock, **failure):
    """Serve Patient, Condition and Procedure normally; make the Observation search fail as asked."""
    resources = scenario(NAME).resources
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    conditions = [r for r in resources if r["resourceType"] == "Condition"]
    mock.add(responses.GET, re.compile(FHIR_SERVER + r"/Patient/.*"), json=patient)
    mock.add(responses.GET, re.compile(FHIR_SERVER + r"/Condition\?.*"), json=searchset(conditions))
    mock.add(responses.GET, re.compile(FHIR_SERVER + r"/Procedure\?.*"), json=searchset([]))
    mock.add(responses.GET, re.compile(FHIR_SERVER + r"/Observation\?.*"), **failure)


@pytest.mark.parametrize(
    "failure, category, detail",
    [
        (dict(status=500), "http_error", "HTTP 500"),
        (dict(status=401), "http_error", "HTTP 401"),
        (dict(status=404), "http_error", "search answered HTTP 404"),
        (dict(body=b"<html>gateway error</html>", status=200), "invalid_response", "not JSON"),
        (dict(json={"resourceType": "OperationOutcome", "issue": []}), "invalid_response", "OperationOutcome"),
        (dict(body=__import__("requests").ConnectionError("refused")), "unreachable", "ConnectionError"),
    ],
)
@responses.activate
def test_a_failing_observation_search_is_412_naming_the_key_and_only_a_category(app, log_lines, failure, category, detail):
    only_observations_fail(responses.mock, **failure)
    response = app.test_client().post(URL, json=request_without_prefetch(NAME))
    assert response.status_code == 412
    (missing,) = response.json["error"]["missing"]
    assert missing["key"] == "observations" and missing["reason"] == f"not in prefetch; FHIR server: {category}"
    # The detail is for operators: in the log, never in the answer.
    assert detail not in response.get_data(as_text=True)
    assert any(
        line.get("event") == "fhir_fallback_failed" and line.get("key") == "observations"
        and line["category"] == category and detail in line["reason"]
        for line in log_lines()
    )


@responses.activate
def test_a_next_link_that_loops_ends_paging_with_the_pages_read(app, log_lines):
    observations = [r for r in scenario(NAME).resources if r["resourceType"] == "Observation"]
    loop = f"{FHIR_SERVER}/Observation?page=again"
    only_observations_fail(responses.mock, json=searchset(observations, loop))
    responses.add(responses.GET, loop, json=searchset([], loop))
    started = time.monotonic()
    response = app.test_client().post(URL, json=request_without_prefetch(NAME))
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]
    assert any(line.get("event") == "fhir_paging_loop" for line in log_lines())


@responses.activate
def test_paging_stops_at_the_bound_and_says_the_data_is_incomplete(tmp_path):
    observations = [r for r in scenario(NAME).resources if r["resourceType"] == "Observation"]
    only_observations_fail(responses.mock, json=searchset(observations, f"{FHIR_SERVER}/Observation?page=1"))
    for page in range(1, 6):
        responses.add(responses.GET, f"{FHIR_SERVER}/Observation?page={page}", json=searchset([], f"{FHIR_SERVER}/Observation?page={page + 1}"))
    app = make_app(tmp_path, FHIR_MAX_PAGES=3)
    response = app.test_client().post(URL, json=request_without_prefetch(NAME))
    assert response.status_code == 200
    assert response.headers["X-Calcinosis-Incomplete"] == "observations"
    assert sum("/Observation" in c.request.url for c in responses.calls) == 3


@responses.activate
def test_a_next_link_to_another_host_is_not_followed_with_the_token(app):
    observations = [r for r in scenario(NAME).resources if r["resourceType"] == "Observation"]
    only_observations_fail(responses.mock, json=searchset(observations, "http://127.0.0.2:8/fhir/Observation?page=2"))
    response = app.test_client().post(URL, json=request_without_prefetch(NAME))
    assert response.status_code == 412
    assert response.json["error"]["missing"][0]["reason"] == "not in prefetch; FHIR server: invalid_response"
    assert not any("127.0.0.2" in c.request.url for c in responses.calls)


class _SlowFhirServer(http.server.BaseHTTPRequestHandler):
    delay = 3.0

    def do_GET(self):  # noqa: N802 - http.server's naming
        time.sleep(self.delay)
        body = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "entry": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowFhirServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def test_a_slow_fhir_server_times_out_within_the_budget_as_412(tmp_path, slow_server, log_lines):
    app = make_app(tmp_path, FHIR_TIMEOUT=0.5, FHIR_BUDGET=1.0)
    request = request_without_prefetch(NAME)
    request["fhirServer"] = slow_server
    started = time.monotonic()
    response = app.test_client().post(URL, json=request)
    elapsed = time.monotonic() - started
    assert response.status_code == 412
    assert all(m["reason"].endswith("FHIR server: timeout") for m in response.json["error"]["missing"])
    assert elapsed < 1.5  # the four keys are fetched in parallel, each within the timeout
    assert sum(1 for line in log_lines() if line.get("event") == "fhir_fallback_failed") == 4  # patient, observations, conditions, procedures
