"""The service in a real, independently written CDS client: the CDS Hooks Sandbox in chromium.

Each test loads the sandbox with a fixture patient from the FHIR test server. The sandbox runs
discovery, fills the prefetch templates itself (POST /{type}/_search), signs its calls with its
ES384 key and renders the cards; the service pages through what the sandbox's prefetch left.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter

import pytest
import requests

from service.harness import load_cases, load_expectations
from tests.conftest import FIXTURES, make_app
from tests.requests_builder import request_with_prefetch

from .sandbox import ARTEFACTS, Card, PatientView, Sandbox, card_from_service, card_locator, hook_call, rendered_cards
from .stack import sandbox_issuer, start_service

pytestmark = pytest.mark.e2e

# The sandbox reads a patient only from the FHIR test server, so a scenario whose data no FHIR
# server could serve as written (scenarios.yaml says why) has nothing to compare here.
NOT_SERVABLE = {name: e.fhir_server for name, e in load_expectations(FIXTURES).items() if e.fhir_server}
NOT_SERVABLE["reference-forms.json"] = (
    "its absolute references name the mocked FHIR server base of the HTTP tests, not this test "
    "server's base, so no search here returns them as this patient's"
)
SCENARIOS = sorted(p.name for p in FIXTURES.glob("*.json") if p.name not in NOT_SERVABLE)
HIGH_PRODUCT_DIALYSIS = "esrd-dialysis-high-product.json"  # ESRD on dialysis, Ca x P 74.9: scenarios.yaml
WITH_SUGGESTIONS = "dialysis-livedo-high-product.json"  # calciphylaxis-workup and -risk cards, both with suggestions


def patient_id(name: str) -> str:
    """The Patient id inside a fixture bundle (the file name without .json, by convention)."""
    case = next(load_cases([FIXTURES / name]))
    return next(r["id"] for r in case.resources if r["resourceType"] == "Patient")


@pytest.fixture(scope="session")
def service_answers(tmp_path_factory) -> dict[str, list[Card]]:
    """The service's own answer for every fixture: in-process, with prefetch, at the pinned moment."""
    client = make_app(tmp_path_factory.mktemp("in-process")).test_client()
    answers = {}
    for name in SCENARIOS:
        response = client.post("/cds-services/calcinosis-risk", json=request_with_prefetch(name))
        assert response.status_code == 200, (name, response.json)
        answers[name] = sorted(card_from_service(card) for card in response.json["cards"])
    return answers


def explain(rendered: list[Card], expected: list[Card]) -> str:
    missing = Counter(expected) - Counter(rendered)
    extra = Counter(rendered) - Counter(expected)
    return f"missing from the sandbox: {sorted(missing.elements())}; rendered but not in the service's answer: {sorted(extra.elements())}"


@pytest.fixture(scope="session")
def patient_views(request, browser_context, static_files, fhir_server, service, service_answers) -> dict[str, PatientView]:
    """The patient views in the sandbox, three pages at a time (the run must stay short).

    The fixtures of the selected patient-view tests, and the two that other tests read.
    """
    selected = [
        item.callspec.params["name"] for item in request.session.items
        if getattr(item, "originalname", None) == "test_patient_view_renders_exactly_the_services_cards"
    ]
    names = sorted(set(selected) | {HIGH_PRODUCT_DIALYSIS, WITH_SUGGESTIONS})
    sandbox = Sandbox(browser_context, static_files.base_url, fhir_server.base_url, ARTEFACTS)
    ids = {name: patient_id(name) for name in names}
    try:
        views = sandbox.view_patients(service.base_url, list(ids.values()), {ids[n]: service_answers[n] for n in names})
    finally:
        sandbox.close_pages()
    return {name: views[ids[name]] for name in names}


def artefacts_of(view: PatientView) -> str:
    return "\ne2e artefacts (screenshot, browser console):\n" + "\n".join(f"  {p}" for p in view.artefacts)


@pytest.mark.parametrize("name", SCENARIOS)
def test_patient_view_renders_exactly_the_services_cards(patient_views, service_answers, name):
    view = patient_views[name]
    assert view.problem is None, view.problem + artefacts_of(view)
    assert view.cards == service_answers[name], explain(view.cards, service_answers[name]) + artefacts_of(view)


def test_the_sandbox_prefetches_and_the_service_pages_through_the_rest(patient_views, fhir_server):
    # 4 Observations and 4 Conditions; the test server's pages hold at most 3 entries.
    view = patient_views[HIGH_PRODUCT_DIALYSIS]
    assert view.call is not None and view.call.status == 200, view.problem
    assert set(view.call.request["prefetch"]) >= {"patient", "observations", "conditions"}, "the sandbox filled the prefetch templates"
    about = f"patient={view.patient_id}"
    seen = [s for s in fhir_server.seen if about in s.path or about in s.body]
    by_browser = [s for s in seen if "python-requests" not in s.user_agent]
    by_service = [s for s in seen if "python-requests" in s.user_agent]
    assert any(s.method == "POST" and s.path == "/Observation/_search" and s.status == 200 for s in by_browser), seen
    assert any(s.method == "POST" and s.path == "/Condition/_search" and s.status == 200 for s in by_browser), seen
    paged = sorted(s.path.split("?")[0] for s in by_service if s.method == "GET" and "_offset=3" in s.path and s.status == 200)
    assert paged == ["/Condition", "/Observation"], f"the service should fetch page 2 of both searches: {seen}"


def test_the_sandboxs_signed_calls_are_accepted(patient_views, service):
    """Every patient view's hook call was authenticated and answered; the service refused none."""
    events = service.log_events()
    answered = {e.get("hookInstance") for e in events if e.get("event") == "hook_answered"}
    calls = {name: view.call.request.get("hookInstance") for name, view in patient_views.items() if view.call}
    assert calls, "no patient view made a hook call"
    assert {name: i for name, i in calls.items() if i not in answered} == {}
    assert [e for e in events if e.get("event") == "auth_refused"] == []
    assert not [e for e in events if e.get("event") == "auth_disabled"], "the service must check the tokens"


def feedback_rows(service) -> list[dict]:
    with sqlite3.connect(f"file:{service.db_path}?mode=ro", uri=True, timeout=5) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(
            "SELECT card_uuid, outcome, accepted_suggestions, rule_id, known_card, override_reason_system, override_reason_code FROM feedback"
        )]


def issued_suggestions(service, card_uuid: str) -> list[str]:
    with sqlite3.connect(f"file:{service.db_path}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT suggestion_uuids FROM issued_cards WHERE card_uuid = ?", (card_uuid,)).fetchone()
    assert row is not None, f"the service did not record issuing card {card_uuid}"
    return json.loads(row[0])


def test_taking_a_suggestion_stores_accepted_and_dismiss_with_a_reason_stores_overridden(sandbox, service):
    page, call = sandbox.open_patient(service.base_url, patient_id(WITH_SUGGESTIONS))
    assert call.status == 200, call.response
    rendered_cards(page, expected_count=len(call.cards))
    with_suggestions = [card for card in call.cards if card.get("suggestions")]
    assert len(with_suggestions) >= 2, f"{WITH_SUGGESTIONS} should give two cards with suggestions: {call.cards}"
    taken_card, dismissed_card = with_suggestions[0], with_suggestions[1]
    suggestion = taken_card["suggestions"][0]
    feedback_url = f"{service.base_url}/cds-services/calcinosis-risk/feedback"

    with page.expect_response(lambda r: r.url == feedback_url) as answer:
        card_locator(page, taken_card["summary"]).get_by_role("button", name=suggestion["label"]).click()
    assert answer.value.status == 200, answer.value.text()
    # The card offers override reasons, so the sandbox's Dismiss has a menu of them: pick one
    # that snoozes nothing, so later views of this patient are unchanged.
    reason = next(r for r in dismissed_card["overrideReasons"] if r["code"] == "not-clinically-relevant")
    card_locator(page, dismissed_card["summary"]).get_by_role("button", name="select dismiss reason").click()
    with page.expect_response(lambda r: r.url == feedback_url) as answer:
        page.get_by_role("menuitem", name=reason["display"]).click()
    assert answer.value.status == 200, answer.value.text()

    rows = {row["card_uuid"]: row for row in feedback_rows(service)}
    accepted, overridden = rows.get(taken_card["uuid"]), rows.get(dismissed_card["uuid"])
    assert accepted is not None and accepted["outcome"] == "accepted", rows
    assert json.loads(accepted["accepted_suggestions"]) == [suggestion["uuid"]]
    assert suggestion["uuid"] in issued_suggestions(service, taken_card["uuid"])
    assert overridden is not None and overridden["outcome"] == "overridden", rows
    assert json.loads(overridden["accepted_suggestions"]) == []
    assert (overridden["override_reason_system"], overridden["override_reason_code"]) == (reason["system"], reason["code"])
    assert accepted["known_card"] == overridden["known_card"] == 1
    assert {accepted["rule_id"], overridden["rule_id"]} == {
        card_from_service(taken_card).rule, card_from_service(dismissed_card).rule,
    }
    # The sandbox also asks its public default service for cards: the browser must have refused that.
    assert "https://sandbox-services.cds-hooks.org/cds-services" in sandbox.blocked, sandbox.blocked


def test_another_issuer_key_gets_401_in_the_services_log(sandbox, e2e_dir, sandbox_jwks, fhir_server):
    """Same issuer and kid, another public key: the sandbox's signature cannot verify."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    kid = sandbox_jwks["keys"][0]["kid"]
    other = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key()))
    other.update(kid=kid, use="sig", alg="ES384")
    wrong = start_service(e2e_dir / "wrong-key", sandbox_issuer({"keys": [other]}, fhir_server), workers=1)
    try:
        page, call = sandbox.open_patient(wrong.base_url, patient_id(WITH_SUGGESTIONS))
        events = wait_for_log(wrong, 0, lambda e: e.get("event") == "request_error" and e.get("path") == "/cds-services/calcinosis-risk")
        refused = [e for e in events if e.get("event") == "auth_refused"]
        assert refused and {e["code"] for e in refused} == {"invalid_signature"}, events
        assert [e["status"] for e in events if e.get("event") == "request_error"] == [401], events
        assert not [e for e in events if e.get("event") == "hook_answered"], events
    finally:
        wrong.stop()


def wait_for_log(service, since: int, wanted, timeout: float = 10.0) -> list[dict]:
    """The service's log events from `since`, once one matches `wanted` (a worker writes it after answering)."""
    deadline = time.monotonic() + timeout
    while True:
        events = service.log_events(since)
        if any(wanted(e) for e in events) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(wanted(e) for e in events), f"no such event in the service's log within {timeout:.0f} s: {events}"
    return events


def test_rx_sign_shows_the_calcium_load_card_for_a_calcium_binder(sandbox, service):
    services = requests.get(f"{service.base_url}/cds-services", timeout=10).json()["services"]
    order_sign = [s["id"] for s in services if s["hook"] == "order-sign"]
    if not order_sign:
        pytest.skip(f"the service's discovery lists no order-sign service (only {[s['id'] for s in services]}): nothing to drive in 'Rx Sign'")
    page, call = sandbox.open_patient(service.base_url, patient_id(HIGH_PRODUCT_DIALYSIS))
    assert call.status == 200, call.response
    page.get_by_text("Rx Sign", exact=True).click()
    page.locator('input[name="medication-input"]').fill("calcium acetate")
    page.get_by_text("calcium acetate 667 MG Oral Capsule", exact=True).click()
    sign_url = f"{service.base_url}/cds-services/{'calcinosis-order-sign' if 'calcinosis-order-sign' in order_sign else order_sign[0]}"
    with page.expect_response(lambda r: r.url == sign_url and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Sign Order").click()
    signed = hook_call(answer.value)
    assert signed.status == 200, signed.response
    drafts = signed.request["context"]["draftOrders"]["entry"]
    assert any("calcium acetate" in json.dumps(e).lower() for e in drafts), drafts
    rendered = rendered_cards(page, expected_count=len(signed.cards))
    load_cards = [c for c in rendered if c.rule == "calcium-load-in-high-product"]
    assert load_cards, f"no calcium-load card rendered; the sandbox shows {rendered}"
    assert load_cards[0].indicator == "warning"
    assert sorted(rendered) == sorted(card_from_service(c) for c in signed.cards)
