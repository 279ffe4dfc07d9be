"""Every fixture scenario through the HTTP endpoint, with prefetch and from a mocked FHIR server.

The expected card set of a scenario is the set of rules whose `tests.fires` names it;
every other rule must stay silent. `rules test` checks the same lists rule by rule.
"""
from __future__ import annotations

import orjson
import pytest
import responses
import yaml

from service.engine.loader import load_ruleset
from tests.conftest import FIXTURES, RULES
from tests.fhir_server import FakeFhirServer
from tests.requests_builder import request_with_prefetch, request_without_prefetch, scenario

RULESET = load_ruleset(RULES)
SCENARIOS = sorted(p.name for p in FIXTURES.glob("*.json"))
URL = "/cds-services/calcinosis-risk"


PATIENT_VIEW_RULES = RULESET.rules_for("patient-view")  # order-hook rules have their own fixtures (fixtures/fhir/orders/)


def expected(name: str) -> set[str]:
    return {rule.id for rule in PATIENT_VIEW_RULES if name in rule.tests_fire}


def fired(response) -> set[str]:
    assert response.status_code == 200, response.json
    return {card["source"]["topic"]["code"] for card in response.json["cards"]}


def test_every_scenario_is_named_by_every_rule_and_described():
    described = yaml.safe_load((FIXTURES / "scenarios.yaml").read_text())
    assert set(described) == set(SCENARIOS)
    for rule in PATIENT_VIEW_RULES:
        assert set(rule.tests_fire) | set(rule.tests_silent) == set(SCENARIOS), rule.id
        assert not set(rule.tests_fire) & set(rule.tests_silent), rule.id


def test_each_rule_fires_once_and_misses_twice_at_least():
    for rule in PATIENT_VIEW_RULES:
        assert len(rule.tests_fire) >= 1 and len(rule.tests_silent) >= 2, rule.id


def test_every_fixture_is_a_valid_fhir_r4_bundle():
    from fhir.resources.R4B.bundle import Bundle

    for name in SCENARIOS:
        Bundle.model_validate_json((FIXTURES / name).read_bytes())


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_with_prefetch_gives_exactly_its_expected_cards(client, name):
    assert fired(client.post(URL, json=request_with_prefetch(name))) == expected(name)


@pytest.mark.parametrize("name", SCENARIOS)
@responses.activate
def test_scenario_from_the_fhir_server_gives_the_same_cards(client, name):
    FakeFhirServer(responses.mock, scenario(name).resources, page_size=3)
    assert fired(client.post(URL, json=request_without_prefetch(name))) == expected(name)


def test_rules_test_command_passes_on_the_shipped_rules(capsys):
    from service.cli import rules_main

    assert rules_main(["test"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out


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
