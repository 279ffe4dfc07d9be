"""order-select / order-sign context validation: every malformed draftOrders or selections is a 400 naming the field."""
from __future__ import annotations

import copy

import orjson
import pytest

from tests.conftest import FIXTURES

ORDERS = FIXTURES / "orders"
SIGN = "/cds-services/calcinosis-order-sign"
SELECT = "/cds-services/calcinosis-order-select"


def sign_request() -> dict:
    return orjson.loads((ORDERS / "punch-biopsy-sign-livedo.json").read_bytes())


def select_request() -> dict:
    return orjson.loads((ORDERS / "punch-biopsy-select-livedo.json").read_bytes())


def refused(response, field: str, code: str = "invalid_request") -> None:
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["field"] == field and error["code"] == code and error["message"]


def test_missing_draft_orders_is_400_naming_the_field(client):
    body = sign_request()
    del body["context"]["draftOrders"]
    refused(client.post(SIGN, json=body), "context.draftOrders")


@pytest.mark.parametrize("value", ["a bundle", [], {"resourceType": "Patient", "id": "x"}, None])
def test_draft_orders_that_is_not_a_bundle_is_400(client, value):
    body = sign_request()
    body["context"]["draftOrders"] = value
    refused(client.post(SIGN, json=body), "context.draftOrders")


def test_draft_orders_entry_that_is_not_a_list_is_400(client):
    body = sign_request()
    body["context"]["draftOrders"]["entry"] = {"resource": {}}
    refused(client.post(SIGN, json=body), "context.draftOrders.entry")


def test_an_entry_without_a_resource_is_400_naming_the_entry(client):
    body = sign_request()
    body["context"]["draftOrders"]["entry"].append({"fullUrl": "urn:uuid:1"})
    refused(client.post(SIGN, json=body), "context.draftOrders.entry[1].resource")


def test_a_draft_order_without_an_id_is_400(client):
    body = sign_request()
    del body["context"]["draftOrders"]["entry"][0]["resource"]["id"]
    refused(client.post(SIGN, json=body), "context.draftOrders.entry[0].resource.id")


def test_the_same_draft_order_twice_is_400(client):
    body = sign_request()
    entries = body["context"]["draftOrders"]["entry"]
    entries.append(copy.deepcopy(entries[0]))
    refused(client.post(SIGN, json=body), "context.draftOrders.entry[1].resource.id")


def test_a_draft_order_code_of_the_wrong_type_is_400_naming_it(client):
    body = sign_request()
    body["context"]["draftOrders"]["entry"][0]["resource"]["code"] = "11104"
    refused(client.post(SIGN, json=body), "context.draftOrders.entry[0].resource.code")


def test_a_coding_with_a_numeric_code_is_400_naming_it(client):
    body = sign_request()
    body["context"]["draftOrders"]["entry"][0]["resource"]["code"]["coding"][0]["code"] = 11104
    refused(client.post(SIGN, json=body), "context.draftOrders.entry[0].resource.code.coding[0]")


def test_too_many_draft_orders_is_400(client):
    body = sign_request()
    order = body["context"]["draftOrders"]["entry"][0]
    body["context"]["draftOrders"]["entry"] = [
        {"resource": {**order["resource"], "id": f"punch-{i}"}} for i in range(201)
    ]
    refused(client.post(SIGN, json=body), "context.draftOrders.entry", "too_many_draft_orders")


def test_order_select_without_selections_is_400(client):
    body = select_request()
    del body["context"]["selections"]
    refused(client.post(SELECT, json=body), "context.selections")


def test_order_select_with_empty_selections_is_400(client):
    body = select_request()
    body["context"]["selections"] = []
    refused(client.post(SELECT, json=body), "context.selections")


def test_a_selection_naming_no_draft_order_is_400(client):
    body = select_request()
    body["context"]["selections"] = ["ServiceRequest/punch-1", "MedicationRequest/not-there"]
    refused(client.post(SELECT, json=body), "context.selections[1]", "unknown_selection")


def test_an_empty_encounter_id_is_400(client):
    body = sign_request()
    body["context"]["encounterId"] = ""
    refused(client.post(SIGN, json=body), "context.encounterId")


def test_order_sign_needs_user_and_patient_like_patient_view(client):
    body = sign_request()
    del body["context"]["userId"]
    refused(client.post(SIGN, json=body), "context.userId")


def test_a_patient_view_request_to_an_order_service_is_refused(client):
    body = sign_request()
    body["hook"] = "patient-view"
    response = client.post(SIGN, json=body)
    assert response.status_code == 400 and response.json["error"]["code"] == "hook_mismatch"


def test_an_empty_draft_orders_bundle_gives_no_cards(client):
    body = sign_request()
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection"}
    response = client.post(SIGN, json=body)
    assert response.status_code == 200 and response.json == {"cards": []}


def test_other_resource_types_in_draft_orders_are_ignored(client):
    body = sign_request()
    body["context"]["draftOrders"]["entry"].append({"resource": {"resourceType": "NutritionOrder", "id": "diet-1", "status": "draft", "intent": "order"}})
    response = client.post(SIGN, json=body)
    assert {c["source"]["topic"]["code"] for c in response.json["cards"]} == {"punch-biopsy-in-calciphylaxis"}


def test_discovery_gives_each_order_service_prefetch_derived_from_its_rules(client):
    services = {s["id"]: s for s in client.get("/cds-services").json["services"]}
    for service_id, hook in (("calcinosis-order-select", "order-select"), ("calcinosis-order-sign", "order-sign")):
        service = services[service_id]
        assert service["hook"] == hook
        prefetch = service["prefetch"]
        # Ca x P needs calcium and phosphate; kidney failure and skin lesions are Conditions.
        assert "http://loinc.org|17861-6" in prefetch["observations"] and "http://loinc.org|2777-1" in prefetch["observations"]
        assert prefetch["conditions"].startswith("Condition?patient={{context.patientId}}")
        # No order rule reads intact PTH or albumin: the order services do not ask for them.
        assert "2731-8" not in prefetch["observations"] and "1751-7" not in prefetch["observations"]


def test_feedback_on_an_order_card_is_stored_against_its_rule(client):
    response = client.post(SIGN, json=sign_request())
    card = response.json["cards"][0]
    feedback = {"feedback": [{
        "card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-01T12:05:00Z",
        "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
    }]}
    stored = client.post(SIGN + "/feedback", json=feedback)
    assert stored.status_code == 200 and stored.json == {"stored": 1, "unknownCards": []}


def test_order_services_answer_cors_preflight(client):
    response = client.options(SELECT, headers={"Origin": "http://127.0.0.1:3000", "Access-Control-Request-Method": "POST"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Calcinosis-Ignored-Orders" in response.headers["Access-Control-Expose-Headers"]


def test_order_services_are_counted_in_metrics_by_service(client):
    client.post(SIGN, json=sign_request())
    text = client.get("/metrics").get_data(as_text=True)
    assert 'service="calcinosis-order-sign"' in text


def test_order_services_require_a_jwt_when_auth_is_on(tmp_path):
    from tests.conftest import make_app

    client = make_app(tmp_path, AUTH="required").test_client()
    response = client.post(SIGN, json=sign_request())
    assert response.status_code == 401 and response.json["error"]["code"] == "missing_token"
