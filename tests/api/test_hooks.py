"""The CDS Hooks 2.0 protocol through Flask's test client: discovery, invocation, prefetch, errors, CORS."""
from __future__ import annotations

import orjson
import responses

from tests.conftest import make_app
from tests.fhir_server import FakeFhirServer, searchset
from tests.requests_builder import FHIR_SERVER, request_with_prefetch, request_without_prefetch, scenario

URL = "/cds-services/calcinosis-risk"


def test_discovery_lists_the_service_with_prefetch_derived_from_the_rules(client):
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = {s["id"]: s for s in response.json["services"]}
    assert set(services) == {"calcinosis-risk", "calcinosis-order-select", "calcinosis-order-sign"}
    service = services["calcinosis-risk"]
    assert service["hook"] == "patient-view"
    assert service["title"] and service["description"]
    prefetch = service["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    # Codes come from the value sets the rules read: total calcium yes, ionized calcium never.
    assert "http://loinc.org|17861-6" in prefetch["observations"] and "http://loinc.org|2000-8" in prefetch["observations"]
    assert "1995-0" not in prefetch["observations"]
    assert prefetch["conditions"].startswith("Condition?patient={{context.patientId}}")


def test_discovery_prefetch_follows_a_value_set_edit(tmp_path):
    import shutil

    from tests.conftest import RULES

    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    path = rules / "valuesets" / "phosphate.yaml"
    path.write_text(path.read_text() + '  - system: http://loinc.org\n    code: "99999-9"\n    display: Test code\n')
    client = make_app(tmp_path, RULES_DIR=str(rules)).test_client()
    assert "http://loinc.org|99999-9" in client.get("/cds-services").json["services"][0]["prefetch"]["observations"]


def test_full_prefetch_returns_a_spec_true_card(client):
    response = client.post(URL, json=request_with_prefetch("esrd-dialysis-high-product.json"))
    assert response.status_code == 200
    (card,) = response.json["cards"]
    assert card["indicator"] == "warning"
    assert len(card["summary"]) < 140 and "74.9" in card["summary"]
    assert card["uuid"]
    assert card["source"]["label"]
    assert card["source"]["url"] == "https://cds.example.org/rules/calciphylaxis-risk"
    assert card["source"]["topic"] == {"system": "urn:calcinosis-cds:rule", "code": "calciphylaxis-risk", "display": "Calciphylaxis risk in kidney failure"}
    assert card["selectionBehavior"] in ("at-most-one", "any")
    assert all(s["uuid"] for s in card["suggestions"])
    # Values that made it fire, with dates and units as sent.
    assert "10.4 mg/dL" in card["detail"] and "7.2 mg/dL" in card["detail"] and "Observation/" in card["detail"]


def _no_empty_fields(value) -> bool:
    if isinstance(value, dict):
        return all(v not in (None, "", [], {}) and _no_empty_fields(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_empty_fields(v) for v in value)
    return True


def test_cards_never_carry_empty_or_null_optional_fields(client):
    response = client.post(URL, json=request_with_prefetch("dialysis-livedo-high-product.json"))
    cards = response.json["cards"]
    assert {c["source"]["topic"]["code"] for c in cards} == {"calciphylaxis-risk", "calciphylaxis-workup"}
    assert _no_empty_fields(cards)


def test_workup_card_proposes_biopsy_and_radiograph_as_service_requests_for_the_patient(client):
    response = client.post(URL, json=request_with_prefetch("esrd-skin-ulcer-scleroderma.json"))
    workup = next(c for c in response.json["cards"] if c["source"]["topic"]["code"] == "calciphylaxis-workup")
    assert workup["indicator"] == "critical" and workup["selectionBehavior"] == "any"
    resources = [a["resource"] for s in workup["suggestions"] for a in s["actions"]]
    assert {r["resourceType"] for r in resources} == {"ServiceRequest"}
    assert all(r["subject"] == {"reference": "Patient/esrd-skin-ulcer-scleroderma"} for r in resources)
    assert "punch" in workup["detail"].lower() and "thiosulfate" in workup["detail"].lower()


def test_no_rule_firing_answers_an_empty_card_list(client):
    response = client.post(URL, json=request_with_prefetch("no-data-patient.json"))
    assert response.status_code == 200 and response.json == {"cards": []}


def test_null_prefetch_values_mean_no_data_not_an_error(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    request["prefetch"]["observations"] = None
    response = client.post(URL, json=request)
    assert response.status_code == 200
    # Kidney failure without labs: the labs-due card, naming all three.
    (card,) = response.json["cards"]
    assert card["source"]["topic"]["code"] == "ckd-mbd-labs-due"
    assert len(card["suggestions"][0]["actions"]) == 3


@responses.activate
def test_missing_prefetch_is_fetched_from_the_fhir_server_with_the_bearer_token():
    import tempfile
    from pathlib import Path

    server = FakeFhirServer(responses.mock, scenario("esrd-dialysis-high-product.json").resources)
    client = make_app(Path(tempfile.mkdtemp())).test_client()
    response = client.post(URL, json=request_without_prefetch("esrd-dialysis-high-product.json", token="secret-token-123"))
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]
    assert len(server.calls) == 4  # Patient, Observations, Conditions, Procedures
    assert any("/Procedure?" in call.url and "status=completed" in call.url for call in server.calls)
    assert all(call.headers["Authorization"] == "Bearer secret-token-123" for call in server.calls)
    assert any("/Patient/esrd-dialysis-high-product" in call.url for call in server.calls)


@responses.activate
def test_fhir_server_without_authorization_is_called_without_a_token(app):
    server = FakeFhirServer(responses.mock, scenario("esrd-dialysis-high-product.json").resources)
    response = app.test_client().post(URL, json=request_without_prefetch("esrd-dialysis-high-product.json", token=None))
    assert response.status_code == 200 and response.json["cards"]
    assert server.calls and all("Authorization" not in call.headers for call in server.calls)


@responses.activate
def test_a_paged_search_is_followed_to_the_last_page(app):
    resources = scenario("esrd-dialysis-high-product.json").resources
    server = FakeFhirServer(responses.mock, resources, page_size=2)
    response = app.test_client().post(URL, json=request_without_prefetch("esrd-dialysis-high-product.json"))
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]
    observation_pages = [c for c in server.calls if "/Observation" in c.url]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert len(observation_pages) == -(-len(observations) // 2) > 1


@responses.activate
def test_paginated_prefetch_fetches_the_remaining_pages(app):
    resources = scenario("esrd-dialysis-high-product.json").resources
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    responses.add(responses.GET, f"{FHIR_SERVER}/Observation?page=2", body=orjson.dumps(searchset(observations[1:])))
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    request["prefetch"]["observations"] = searchset(observations[:1], f"{FHIR_SERVER}/Observation?page=2")
    request["fhirServer"] = FHIR_SERVER
    response = app.test_client().post(URL, json=request)
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]


@responses.activate
def test_operation_outcome_in_prefetch_is_treated_as_unavailable_and_fetched(app):
    server = FakeFhirServer(responses.mock, scenario("esrd-dialysis-high-product.json").resources)
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    request["prefetch"]["observations"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    request["fhirServer"] = FHIR_SERVER
    response = app.test_client().post(URL, json=request)
    assert response.status_code == 200 and response.json["cards"]
    assert [c.url.split("?")[0].rsplit("/", 1)[1] for c in server.calls] == ["Observation"]


def test_operation_outcome_in_prefetch_without_fhir_server_is_412_naming_the_key(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    request["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    response = client.post(URL, json=request)
    assert response.status_code == 412
    (missing,) = response.json["error"]["missing"]
    assert missing["key"] == "conditions" and "OperationOutcome" in missing["reason"]


def test_missing_prefetch_without_fhir_server_is_412(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    del request["prefetch"]
    response = client.post(URL, json=request)
    assert response.status_code == 412
    error = response.json["error"]
    assert error["code"] == "prefetch_unavailable"
    assert {m["key"] for m in error["missing"]} == {"patient", "observations", "conditions", "procedures"}
    assert all("no fhirServer" in m["reason"] for m in error["missing"])


@responses.activate
def test_unreachable_fhir_server_is_412_with_the_reason(app):
    responses.add(responses.GET, __import__("re").compile(FHIR_SERVER + ".*"), status=503)
    response = app.test_client().post(URL, json=request_without_prefetch("esrd-dialysis-high-product.json"))
    assert response.status_code == 412
    assert all(m["reason"].endswith("FHIR server: http_error") for m in response.json["error"]["missing"])


def test_malformed_json_is_400(client):
    response = client.post(URL, data=b'{"hook": "patient-view",', content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"


def test_request_missing_required_fields_is_400_naming_the_field(client):
    for field in ("hook", "hookInstance", "context"):
        request = request_with_prefetch("no-data-patient.json")
        del request[field]
        response = client.post(URL, json=request)
        assert response.status_code == 400, field
        assert field in response.json["error"]["message"]
    request = request_with_prefetch("no-data-patient.json")
    del request["context"]["userId"]
    assert client.post(URL, json=request).json["error"]["field"] == "context.userId"


def test_fhir_authorization_without_fhir_server_is_400(client):
    request = request_with_prefetch("no-data-patient.json")
    request["fhirAuthorization"] = {"access_token": "x", "token_type": "Bearer"}
    response = client.post(URL, json=request)
    assert response.status_code == 400 and response.json["error"]["field"] == "fhirServer"


def test_a_hook_the_service_does_not_answer_is_400(client):
    request = request_with_prefetch("no-data-patient.json")
    request["hook"] = "order-sign"
    response = client.post(URL, json=request)
    assert response.status_code == 400 and response.json["error"]["code"] == "hook_mismatch"


def test_unknown_service_is_404(client):
    response = client.post("/cds-services/no-such-service", json=request_with_prefetch("no-data-patient.json"))
    assert response.status_code == 404 and response.json["error"]["code"] == "unknown_service"


def test_body_above_the_configured_maximum_is_413(tmp_path):
    client = make_app(tmp_path, MAX_CONTENT_LENGTH=2048).test_client()
    response = client.post(URL, json=request_with_prefetch("esrd-dialysis-high-product.json"))
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large" and "2048" in response.json["error"]["message"]


def test_an_invalid_fhir_resource_is_skipped_and_counted_not_fatal(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    entries = request["prefetch"]["observations"]["entry"]
    calcium = next(e["resource"] for e in entries if e["resource"]["code"]["coding"][0]["code"] in ("17861-6", "2000-8"))
    broken = dict(calcium, id="broken-calcium", effectiveDateTime="2026-10-31T08:00:00Z", valueQuantity={"value": "not a number"})
    entries.append({"resource": broken})
    response = client.post(URL, json=request)
    assert response.status_code == 200
    assert response.headers["X-Calcinosis-Skipped-Resources"] == "1"
    # The next valid calcium is used instead, so the card still fires.
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]


def test_cors_preflight_allows_authorization_and_content_type(client):
    response = client.options(URL, headers={"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code in (200, 204)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


def test_cors_headers_are_on_discovery_and_errors_too(client):
    assert client.get("/cds-services").headers["Access-Control-Allow-Origin"] == "*"
    assert client.post("/cds-services/nope", json={}).headers["Access-Control-Allow-Origin"] == "*"


def test_configured_cors_origins_echo_only_allowed_origins(tmp_path):
    client = make_app(tmp_path, CORS_ORIGINS="https://ehr.example.org").test_client()
    allowed = client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    refused = client.get("/cds-services", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_resources_about_another_patient_are_not_used(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    for entry in request["prefetch"]["conditions"]["entry"]:
        entry["resource"]["subject"] = {"reference": "Patient/someone-else"}
    codes = [c["source"]["topic"]["code"] for c in client.post(URL, json=request).json["cards"]]
    # Without this patient's ESRD diagnosis there is no kidney failure: the risk card must not appear.
    assert "calciphylaxis-risk" not in codes


@responses.activate
def test_a_patient_id_cannot_add_search_parameters_to_fhir_queries(app):
    server = FakeFhirServer(responses.mock, scenario("no-data-patient.json").resources)
    request = request_without_prefetch("no-data-patient.json")
    request["context"]["patientId"] = "p1&patient=p2"
    assert app.test_client().post(URL, json=request).status_code == 200
    searches = [c.url for c in server.calls if "?" in c.url]
    assert searches and all("patient=p1%26patient%3Dp2&" in url for url in searches)
    assert any(c.url.endswith("/Patient/p1%26patient%3Dp2") for c in server.calls)


def test_malformed_json_deep_inside_a_prefetch_entry_is_still_400(client):
    body = orjson.dumps(request_with_prefetch("esrd-dialysis-high-product.json")).decode()
    broken = body.replace('"status":"final"', '"status":"final",,', 1)
    assert broken != body
    response = client.post(URL, data=broken, content_type="application/json")
    assert response.status_code == 400 and response.json["error"]["code"] == "malformed_json"


def test_a_resource_with_wrongly_typed_indexed_fields_is_skipped_and_counted(client):
    request = request_with_prefetch("esrd-dialysis-high-product.json")
    request["prefetch"]["observations"]["entry"].append(
        {"resource": {"resourceType": "Observation", "id": "odd", "status": "final", "code": "17861-6", "effectiveDateTime": 20261031}}
    )
    response = client.post(URL, json=request)
    assert response.status_code == 200
    assert response.headers["X-Calcinosis-Skipped-Resources"] == "1"
    assert [c["source"]["topic"]["code"] for c in response.json["cards"]] == ["calciphylaxis-risk"]
