"""Every fixture scenario through the HTTP endpoint, with prefetch and from a mocked FHIR server.

The expected card set of a scenario is its `expect` in fixtures/fhir/scenarios.yaml, written
beside the reason for it; every other rule must stay silent. `rules test` checks the same.
"""
from __future__ import annotations

import orjson
import pytest
import responses

from service.engine.loader import load_ruleset
from service.harness import load_expectations
from tests.conftest import FIXTURES, RULES
from tests.fhir_server import FakeFhirServer
from tests.requests_builder import request_with_prefetch, request_without_prefetch, scenario

RULESET = load_ruleset(RULES)
EXPECTATIONS = load_expectations(FIXTURES)
SCENARIOS = sorted(p.name for p in FIXTURES.glob("*.json"))
FROM_SERVER = [name for name in SCENARIOS if not EXPECTATIONS[name].fhir_server]
URL = "/cds-services/calcinosis-risk"


PATIENT_VIEW_RULES = RULESET.rules_for("patient-view")  # order-hook rules have their own fixtures (fixtures/fhir/orders/)


def expected(name: str) -> set[str]:
    return set(EXPECTATIONS[name].expect)


def fired(response) -> set[str]:
    assert response.status_code == 200, response.json
    return {card["source"]["topic"]["code"] for card in response.json["cards"]}


def test_every_scenario_has_an_expectation_and_a_reason_and_names_only_known_rules():
    assert set(EXPECTATIONS) == set(SCENARIOS)
    rule_ids = {r.id for r in RULESET.rules}
    for name, expectation in EXPECTATIONS.items():
        assert set(expectation.expect) <= rule_ids, name
        assert len(expectation.reason) > 40, name


def test_each_rule_fires_once_and_misses_twice_at_least():
    for rule in PATIENT_VIEW_RULES:
        fires = [n for n, e in EXPECTATIONS.items() if rule.id in e.expect]
        assert len(fires) >= 1 and len(EXPECTATIONS) - len(fires) >= 2, rule.id


def test_a_rule_file_that_still_lists_tests_is_refused_with_where_they_live_now(tmp_path):
    import shutil

    from service.engine.loader import RuleSetError

    shutil.copytree(RULES, tmp_path / "rules")
    path = tmp_path / "rules" / "metastatic-calcification.yaml"
    path.write_text(path.read_text() + "tests:\n  fires: [hypercalcemia-metastatic.json]\n")
    with pytest.raises(RuleSetError) as caught:
        load_ruleset(tmp_path / "rules")
    assert "fixtures/fhir/scenarios.yaml" in str(caught.value)


def test_every_fixture_is_a_valid_fhir_r4_bundle():
    from fhir.resources.R4B.bundle import Bundle

    for name in SCENARIOS:
        Bundle.model_validate_json((FIXTURES / name).read_bytes())


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_with_prefetch_gives_exactly_its_expected_cards(client, name):
    assert fired(client.post(URL, json=request_with_prefetch(name))) == expected(name)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_under_full_validation_gives_the_same_cards(tmp_path, name):
    from tests.conftest import make_app

    client = make_app(tmp_path, VALIDATION="full").test_client()
    assert fired(client.post(URL, json=request_with_prefetch(name))) == expected(name)


@pytest.mark.parametrize("name", FROM_SERVER)
@responses.activate
def test_scenario_from_the_fhir_server_gives_the_same_cards(client, name):
    FakeFhirServer(responses.mock, scenario(name).resources, page_size=3)
    assert fired(client.post(URL, json=request_without_prefetch(name))) == expected(name)


def test_rules_test_command_passes_on_the_shipped_rules(capsys):
    from service.cli import rules_main

    assert rules_main(["test"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out
    assert f"{len(SCENARIOS)} passed" in out


def test_rules_test_fails_when_an_expectation_is_wrong(tmp_path, capsys):
    import shutil

    from service.cli import rules_main

    shutil.copytree(FIXTURES, tmp_path / "fhir")
    path = tmp_path / "fhir" / "scenarios.yaml"
    text = path.read_text()
    marker = "hypercalcemia-metastatic.json:\n  expect: [metastatic-calcification]"
    assert marker in text
    path.write_text(text.replace(marker, "hypercalcemia-metastatic.json:\n  expect: []"))
    assert rules_main(["test", "--fixtures", str(tmp_path / "fhir")]) == 1
    assert "FAIL  hypercalcemia-metastatic.json: expected no card, fired metastatic-calcification" in capsys.readouterr().out


def _advice(card: dict) -> list[str]:
    """The card's own paragraphs: its detail without the values-used list and the disclaimer."""
    text = card["detail"].split("**Values used**")[0]
    return [p.strip() for p in text.split("\n\n") if p.strip() and not p.startswith("_")]


def _proposals(card: dict) -> list[str]:
    return [
        orjson.dumps(action["resource"]["code"], option=orjson.OPT_SORT_KEYS).decode()
        for suggestion in card.get("suggestions", ())
        for action in suggestion["actions"]
    ]


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_two_cards_for_a_patient_repeat_advice_or_a_proposed_order(client, name):
    cards = client.post(URL, json=request_with_prefetch(name)).json["cards"]
    paragraphs = [p for card in cards for p in _advice(card)]
    proposals = [p for card in cards for p in _proposals(card)]
    assert len(paragraphs) == len(set(paragraphs)), name
    assert len(proposals) == len(set(proposals)), name
