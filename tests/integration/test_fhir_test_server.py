"""The FHIR test server the end-to-end tests put behind the sandbox: what it answers, over real HTTP."""
from __future__ import annotations

import pytest
import requests

from tests.conftest import FIXTURES
from tests.fhir_test_server import FhirTestServer
from tests.requests_builder import TEMPLATES

PATIENT = "esrd-dialysis-high-product"  # 4 Observations, 4 Conditions


@pytest.fixture(scope="module")
def server():
    with FhirTestServer.from_bundles(sorted(FIXTURES.glob("*.json")), max_page_size=3) as server:
        yield server


def search_all(url: str) -> list[dict]:
    """Follow next links the way a client pages, bounded."""
    resources = []
    for _ in range(10):
        bundle = requests.get(url, timeout=5).json()
        resources += [e["resource"] for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if url is None:
            return resources
    pytest.fail("paging did not end within 10 pages")


def test_metadata_is_an_r4_capability_statement(server):
    body = requests.get(f"{server.base_url}/metadata", timeout=5).json()
    assert body["resourceType"] == "CapabilityStatement" and body["fhirVersion"] == "4.0.1"
    assert {r["type"] for r in body["rest"][0]["resource"]} >= {"Patient", "Observation", "Condition"}


def test_patient_read_and_unknown_patient(server):
    assert requests.get(f"{server.base_url}/Patient/{PATIENT}", timeout=5).json()["id"] == PATIENT
    missing = requests.get(f"{server.base_url}/Patient/nobody", timeout=5)
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("key", ["observations", "conditions"])
def test_every_prefetch_search_pages_through_all_of_the_patients_matching_resources(server, key):
    query = TEMPLATES[key].replace("{{context.patientId}}", PATIENT)
    first = requests.get(f"{server.base_url}/{query}", timeout=5).json()
    assert len(first["entry"]) == 3 and any(link["relation"] == "next" for link in first["link"])
    found = search_all(f"{server.base_url}/{query}")
    assert len(found) == first["total"] == 4
    assert {r["subject"]["reference"] for r in found} == {f"Patient/{PATIENT}"}


def test_post_search_with_a_form_body_answers_as_get_does(server):
    query = TEMPLATES["observations"].replace("{{context.patientId}}", PATIENT)
    kind, _, params = query.partition("?")
    posted = requests.post(
        f"{server.base_url}/{kind}/_search", data=params, timeout=5,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ).json()
    got = requests.get(f"{server.base_url}/{query}", timeout=5).json()
    assert [e["resource"]["id"] for e in posted["entry"]] == [e["resource"]["id"] for e in got["entry"]]


def test_sort_by_date_descending_puts_the_latest_result_first(server):
    bundle = requests.get(f"{server.base_url}/Observation?patient={PATIENT}&_sort=-date&_count=3", timeout=5).json()
    dates = [e["resource"]["effectiveDateTime"] for e in bundle["entry"]]
    assert dates == sorted(dates, reverse=True)


def test_an_unsupported_search_parameter_is_400_not_ignored(server):
    answer = requests.get(f"{server.base_url}/Observation?patient={PATIENT}&category=laboratory", timeout=5)
    assert answer.status_code == 400
    assert "category" in answer.json()["issue"][0]["diagnostics"]


def test_cors_preflight_allows_what_the_browser_asks_for(server):
    answer = requests.options(
        f"{server.base_url}/Observation/_search", timeout=5,
        headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:1"
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert answer.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
