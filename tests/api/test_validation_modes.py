"""Strict checks in the hot path, full validation on demand (CDS_VALIDATION), and what each one skips.

The scenario: ESRD on dialysis with Ca 10.4 x P 7.2 drawn together 5 days ago (74.9 >= 70), so
calciphylaxis-risk fires (fixtures/fhir/scenarios.yaml says why). Each test breaks one element
of that calcium result and checks whether the card still fires.
"""
from __future__ import annotations

import pytest

from tests.conftest import make_app
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"
SCENARIO = "esrd-dialysis-high-product.json"
CALCIUM = "esrd-dialysis-high-product-ca-5"


def request_with_calcium(**changes) -> dict:
    request = request_with_prefetch(SCENARIO)
    found = 0
    for value in request["prefetch"].values():
        for entry in (value or {}).get("entry", []):
            if entry["resource"].get("id") == CALCIUM:
                entry["resource"].update(changes)
                found += 1
    assert found == 1
    return request


def rules_fired(client, request: dict) -> list[str]:
    response = client.post(URL, json=request)
    assert response.status_code == 200, response.json
    return [card["source"]["topic"]["code"] for card in response.json["cards"]]


@pytest.fixture
def full_client(tmp_path):
    return make_app(tmp_path, VALIDATION="full").test_client()


def test_the_scenario_fires_calciphylaxis_risk_in_both_modes(client, full_client):
    assert "calciphylaxis-risk" in rules_fired(client, request_with_prefetch(SCENARIO))
    assert "calciphylaxis-risk" in rules_fired(full_client, request_with_prefetch(SCENARIO))


def test_a_calcium_result_with_a_malformed_performer_still_counts(client, full_client):
    broken = request_with_calcium(performer=[{"reference": 42}])
    assert "calciphylaxis-risk" in rules_fired(client, broken)
    # Full validation rejects the whole resource for an element no rule reads: the risk goes unseen.
    assert "calciphylaxis-risk" not in rules_fired(full_client, broken)


@pytest.mark.parametrize("changes", [
    {"valueQuantity": {"value": "10.4", "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}},
    {"valueQuantity": {"value": 10.4, "comparator": "about", "unit": "mg/dL"}},
    {"effectiveDateTime": "2026-10-27T08:00:00"},
    {"code": {"coding": [{"system": "http://loinc.org", "code": "17861-6", "display": ""}]}},
], ids=["value-as-text", "comparator-not-in-value-set", "time-without-zone", "empty-display"])
def test_a_calcium_result_with_a_malformed_element_the_engine_reads_is_not_used(client, changes):
    assert "calciphylaxis-risk" not in rules_fired(client, request_with_calcium(**changes))


def test_an_unknown_validation_mode_stops_start_up(tmp_path):
    with pytest.raises(SystemExit, match="CDS_VALIDATION='partial'"):
        make_app(tmp_path, VALIDATION="partial")
