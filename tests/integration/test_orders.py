"""The order-select and order-sign services over HTTP, driven by the order fixtures.

Each request in fixtures/fhir/orders/ is a full hook request; its expected cards and the
reason for them are in fixtures/fhir/orders/scenarios.yaml (worked out by hand).
"""
from __future__ import annotations

import copy

import orjson
import pytest
import responses
import yaml

from service.engine.loader import load_ruleset
from service.harness import load_cases, run_case
from tests.conftest import FIXTURES, RULES
from tests.fhir_server import FakeFhirServer

ORDERS = FIXTURES / "orders"
SCENARIOS = yaml.safe_load((ORDERS / "scenarios.yaml").read_text())
NAMES = sorted(SCENARIOS)
RULESET = load_ruleset(RULES)
ORDER_RULES = {"punch-biopsy-in-calciphylaxis", "calcium-load-in-high-product", "steroids-in-calciphylaxis"}
from tests.requests_builder import FHIR_SERVER as FHIR_BASE  # mocked with `responses`: loopback-looking
SERVICE = {"order-select": "/cds-services/calcinosis-order-select", "order-sign": "/cds-services/calcinosis-order-sign"}


def load(name: str) -> dict:
    return orjson.loads((ORDERS / name).read_bytes())


def post(client, body: dict):
    return client.post(SERVICE[body["hook"]], json=body)


def fired(response) -> set[str]:
    assert response.status_code == 200, response.json
    return {card["source"]["topic"]["code"] for card in response.json["cards"]}


def cards_by_rule(response) -> dict[str, dict]:
    assert response.status_code == 200, response.json
    return {card["source"]["topic"]["code"]: card for card in response.json["cards"]}


def test_every_order_fixture_is_described_and_every_order_rule_fires_and_stays_silent_somewhere():
    assert set(NAMES) == {p.name for p in ORDERS.glob("*.json")}
    for rule_id in ORDER_RULES:
        firing = [n for n in NAMES if rule_id in SCENARIOS[n]["expect"]]
        silent = [n for n in NAMES if rule_id not in SCENARIOS[n]["expect"]]
        assert len(firing) >= 2 and len(silent) >= 2, rule_id
    for name in NAMES:
        assert set(SCENARIOS[name]["expect"]) <= ORDER_RULES and SCENARIOS[name]["reason"].strip(), name


def test_order_rules_serve_only_the_order_hooks_and_patient_view_rules_stay_on_patient_view():
    for rule in RULESET.rules:
        expected = ("order-select", "order-sign") if rule.id in ORDER_RULES else ("patient-view",)
        assert rule.hooks == expected, rule.id


@pytest.mark.parametrize("name", NAMES)
def test_order_request_with_prefetch_gives_exactly_its_expected_cards(client, name):
    assert fired(post(client, load(name))) == set(SCENARIOS[name]["expect"])


@pytest.mark.parametrize("name", NAMES)
@responses.activate
def test_order_request_from_the_fhir_server_gives_the_same_cards(client, name):
    body = load(name)
    resources = [entry["resource"] for value in body.pop("prefetch").values() if value for entry in value.get("entry", [])]
    server = FakeFhirServer(responses.mock, resources, page_size=3, base=FHIR_BASE)
    body["fhirServer"] = FHIR_BASE
    body["fhirAuthorization"] = {"access_token": "opaque-fhir-token", "token_type": "Bearer", "expires_in": 300, "scope": "patient/*.read", "subject": "calcinosis-cds"}
    assert fired(post(client, body)) == set(SCENARIOS[name]["expect"])
    assert server.calls, "the service must have fetched the patient's data"


@pytest.mark.parametrize("name", NAMES)
def test_the_engine_in_process_agrees_with_the_expectations(name):
    (case,) = load_cases([ORDERS / name])
    assert set(run_case(RULESET, case).fired) == set(SCENARIOS[name]["expect"])


def test_punch_biopsy_card_replaces_the_draft_by_its_id_and_keeps_its_reason_and_body_site(client):
    body = load("punch-biopsy-sign-livedo.json")
    card = cards_by_rule(post(client, body))["punch-biopsy-in-calciphylaxis"]
    draft = body["context"]["draftOrders"]["entry"][0]["resource"]
    assert card["indicator"] == "warning" and "incisional" in card["summary"]
    assert card["selectionBehavior"] == "at-most-one"
    (suggestion,) = card["suggestions"]
    delete, create = suggestion["actions"]
    assert delete == {"type": "delete", "description": delete["description"], "resourceId": "ServiceRequest/punch-1"}
    assert "resource" not in delete
    resource = create["resource"]
    assert create["type"] == "create" and "resourceId" not in create
    assert resource["resourceType"] == "ServiceRequest" and "id" not in resource
    assert [(c["system"], c["code"]) for c in resource["code"]["coding"]] == [("http://www.ama-assn.org/go/cpt", "11106")]
    assert resource["reasonCode"] == draft["reasonCode"] and resource["bodySite"] == draft["bodySite"]
    assert resource["subject"] == {"reference": f"Patient/{body['context']['patientId']}"}
    assert resource["encounter"] == {"reference": f"Encounter/{body['context']['encounterId']}"}
    assert "Punch biopsy of skin" in card["detail"] and "ServiceRequest/punch-1" in card["detail"]


def test_a_punch_biopsy_without_reason_or_body_site_gets_an_incisional_biopsy_without_them(client):
    body = load("punch-biopsy-sign-livedo.json")
    draft = body["context"]["draftOrders"]["entry"][0]["resource"]
    del draft["reasonCode"], draft["bodySite"]
    card = cards_by_rule(post(client, body))["punch-biopsy-in-calciphylaxis"]
    created = card["suggestions"][0]["actions"][1]["resource"]
    assert "reasonCode" not in created and "bodySite" not in created


def test_a_draft_body_site_that_is_not_fhir_is_not_copied_into_the_proposal(client):
    body = load("punch-biopsy-sign-livedo.json")
    body["context"]["draftOrders"]["entry"][0]["resource"]["bodySite"] = [{"coding": "left calf"}]
    card = cards_by_rule(post(client, body))["punch-biopsy-in-calciphylaxis"]
    delete, create = card["suggestions"][0]["actions"]
    assert delete["resourceId"] == "ServiceRequest/punch-1"
    assert "bodySite" not in create["resource"] and "reasonCode" not in create["resource"]


def test_calcium_load_card_only_deletes_the_draft_and_names_product_and_other_binders(client):
    card = cards_by_rule(post(client, load("calcium-acetate-sign-high-product.json")))["calcium-load-in-high-product"]
    assert card["summary"].startswith("calcium acetate 667 MG Oral Capsule adds to the calcium load")
    (suggestion,) = card["suggestions"]
    assert suggestion["actions"] == [{"type": "delete", "description": suggestion["actions"][0]["description"], "resourceId": "MedicationRequest/ca-acetate-1"}]
    assert card["selectionBehavior"] == "at-most-one"
    assert "74.9 mg²/dL²" in card["detail"] and "2026-10-27" in card["detail"]
    for binder in ("sevelamer", "lanthanum", "sucroferric oxyhydroxide", "ferric citrate"):
        assert binder in card["detail"]


def test_calcium_load_card_reads_a_contained_medication(client):
    card = cards_by_rule(post(client, load("calcitriol-contained-select-skin-ulcer.json")))["calcium-load-in-high-product"]
    assert "Calcitriol 0.00025 MG Oral Capsule" in card["summary"]
    assert card["suggestions"][0]["actions"][0]["resourceId"] == "MedicationRequest/calcitriol-1"
    assert "possibility of calciphylaxis" in card["detail"] and "at or above 70" not in card["detail"]


def test_steroid_card_is_information_without_suggestion_and_cites_its_source(client):
    card = cards_by_rule(post(client, load("prednisone-sign-livedo.json")))["steroids-in-calciphylaxis"]
    assert card["indicator"] == "info"
    assert "suggestions" not in card and "selectionBehavior" not in card
    assert "not helpful in calciphylaxis" in card["summary"] and "Prednisone 20 MG Oral Tablet" in card["summary"]
    assert any(link["url"] == "https://pubmed.ncbi.nlm.nih.gov/2184792/" for link in card["links"])


def test_each_order_card_deletes_its_own_draft(client):
    cards = cards_by_rule(post(client, load("three-orders-sign-livedo.json")))
    assert cards["punch-biopsy-in-calciphylaxis"]["suggestions"][0]["actions"][0]["resourceId"] == "ServiceRequest/punch-1"
    assert cards["calcium-load-in-high-product"]["suggestions"][0]["actions"][0]["resourceId"] == "MedicationRequest/ca-acetate-1"


def test_two_calcium_load_drafts_get_one_delete_action_each(client):
    body = load("calcium-acetate-sign-high-product.json")
    second = copy.deepcopy(body["context"]["draftOrders"]["entry"][0])
    second["resource"]["id"] = "ca-acetate-2"
    body["context"]["draftOrders"]["entry"].append(second)
    card = cards_by_rule(post(client, body))["calcium-load-in-high-product"]
    ids = [a["resourceId"] for a in card["suggestions"][0]["actions"]]
    assert ids == ["MedicationRequest/ca-acetate-1", "MedicationRequest/ca-acetate-2"]


def test_a_draft_order_about_another_patient_is_ignored_and_counted(client):
    response = post(client, load("punch-biopsy-other-patient-sign.json"))
    assert response.status_code == 200 and response.json["cards"] == []
    assert response.headers["X-Calcinosis-Ignored-Orders"] == "1"


def test_order_select_answers_only_for_the_selected_orders(client):
    selected = post(client, load("punch-biopsy-select-livedo.json"))
    not_selected = post(client, load("punch-biopsy-not-selected-livedo.json"))
    assert fired(selected) == {"punch-biopsy-in-calciphylaxis"} and fired(not_selected) == set()


def test_a_medication_reference_outside_the_request_makes_the_order_unknown_not_absent():
    body = load("paricalcitol-referenced-sign-high-product.json")
    body["context"]["draftOrders"]["entry"].pop()  # the Medication it refers to
    (case,) = load_cases_from(body)
    result = run_case(RULESET, case)
    finding = next(f for f in result.evaluation.findings if f.rule.id == "calcium-load-in-high-product")
    assert finding.result is None and not finding.fired
    fact = result.evaluation.evaluator.value_of("calcium_load_order")
    assert fact.state == "unknown" and "Medication/paricalcitol-med is not in context.draftOrders" in " ".join(fact.notes)


def load_cases_from(body: dict):
    from service.harness import case_from_json

    return [case_from_json(body, "inline")]


def test_patient_view_rules_never_answer_an_order_hook(client):
    # The livedo patient gets calciphylaxis-workup and -risk cards on patient-view, none at order time.
    response = post(client, load("sevelamer-sign-high-product.json"))
    assert fired(response) == set()


def test_rules_explain_accepts_an_order_hook_request(capsys):
    from service.cli import rules_main

    assert rules_main(["explain", str(ORDERS / "punch-biopsy-sign-livedo.json")]) == 0
    out = capsys.readouterr().out
    assert "hook order-sign" in out and "draft orders in scope: ServiceRequest/punch-1" in out
    assert "punch-biopsy-in-calciphylaxis: FIRED" in out and "calciphylaxis-risk" not in out


def test_replay_runs_order_hook_requests_like_patient_view_ones(capsys):
    from service.replay import main

    assert main([str(ORDERS / "three-orders-sign-livedo.json"), "--json"]) == 0
    line = orjson.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert set(line["rules"]) == ORDER_RULES


def test_rules_test_command_passes_on_the_order_fixtures(capsys):
    from service.cli import rules_main

    assert rules_main(["test", "--fixtures", str(ORDERS)]) == 0
    assert " 0 failed" in capsys.readouterr().out


def test_an_update_action_sends_the_draft_with_its_own_id_and_the_rule_fields(tmp_path):
    import shutil

    from tests.conftest import make_app

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    (rules / "punch-urgent.yaml").write_text(
        "id: punch-urgent\ntitle: Punch biopsy made urgent\ndescription: Test rule for update actions.\n"
        "hooks: [order-sign]\n"
        "when: {fact: punch_biopsy_order, operator: present}\n"
        "card:\n  indicator: info\n  summary: \"Make {punch_biopsy_order} urgent\"\n  detail:\n    - Test.\n"
        "  suggestions:\n    - label: Make it urgent\n      actions:\n        - type: update\n"
        "          description: Mark the draft urgent\n          resource_id: \"{punch_biopsy_order.id}\"\n"
        "          resource: {resourceType: ServiceRequest, status: draft, intent: order, priority: urgent}\n"
    )
    client = make_app(tmp_path, RULES_DIR=str(rules)).test_client()
    body = load("punch-biopsy-sign-no-skin-lesion.json")
    card = cards_by_rule(post(client, body))["punch-urgent"]
    (action,) = card["suggestions"][0]["actions"]
    draft = body["context"]["draftOrders"]["entry"][0]["resource"]
    assert action["type"] == "update" and "resourceId" not in action
    assert action["resource"]["id"] == "punch-1" and action["resource"]["priority"] == "urgent"
    assert action["resource"]["code"] == draft["code"] and action["resource"]["subject"] == draft["subject"]
