"""Override reasons and snoozes through HTTP: what a clinician who dismisses a card sees next time.

Scenario: esrd-dialysis-high-product (ESRD on dialysis, Ca x P 74.9 >= 70) raises the
calciphylaxis-risk card, whose rule snoozes `already-addressed` for 30 days and offers
`data-incorrect` without a snooze (rules/calciphylaxis-risk.yaml).
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid

import pytest

from service.logs import JsonFormatter
from tests.conftest import RULES, make_app
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"
SCENARIO = "esrd-dialysis-high-product.json"
RISK = "calciphylaxis-risk"
REASONS = "urn:calcinosis-cds:override-reason"


def for_patient(body: dict, patient_id: str) -> dict:
    """The same chart under another patient id (every reference rewritten)."""
    text = json.dumps(body).replace("esrd-dialysis-high-product", patient_id)
    return json.loads(text)


def with_phosphate(body: dict, value: float) -> dict:
    """The same chart with a different phosphate result (LOINC 2777-1)."""
    body = json.loads(json.dumps(body))
    for entry in body["prefetch"]["observations"]["entry"]:
        resource = entry["resource"]
        if any(c["code"] == "2777-1" for c in resource["code"]["coding"]):
            resource["valueQuantity"]["value"] = value
    return body


def cards_by_rule(client, body: dict) -> dict[str, dict]:
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.json
    return {card["source"]["topic"]["code"]: card for card in response.json["cards"]}


def dismiss(client, card: dict, code: str | None, system: str | None = REASONS) -> dict:
    """Feedback as the CDS Hooks Sandbox sends it when a card is dismissed with a reason."""
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:03:04.567Z"}
    if code:
        item["overrideReason"] = {"reason": {"code": code, **({"system": system} if system else {})}}
    response = client.post(URL + "/feedback", json={"feedback": [item]})
    assert response.status_code == 200, response.json
    return response.json


class _JsonLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def snooze_log():
    """The service's JSON log lines about snoozes, as an operator would read them."""
    handler = _JsonLines()
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    yield lambda: [e for e in map(json.loads, handler.lines) if e.get("event", "").startswith("snooze_")]
    logger.removeHandler(handler)


@pytest.fixture
def rules_dir(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    return rules


@pytest.fixture
def app(tmp_path, rules_dir):
    return make_app(tmp_path, RULES_DIR=str(rules_dir), UUID=lambda: str(uuid.uuid4()))


@pytest.fixture
def client(app):
    return app.test_client()


def test_every_card_carries_its_rules_override_reasons(client):
    risk = cards_by_rule(client, request_with_prefetch(SCENARIO))[RISK]
    assert [r["code"] for r in risk["overrideReasons"]] == [
        "already-addressed", "under-nephrology-care", "not-clinically-relevant", "palliative-care", "data-incorrect",
    ]
    assert all(r["system"] == REASONS and r["display"] for r in risk["overrideReasons"])
    # tumoral-calcinosis narrows the list: a kidney reason does not fit it.
    tumoral = cards_by_rule(client, request_with_prefetch("tumoral-calcinosis-classic.json"))["tumoral-calcinosis"]
    assert "under-nephrology-care" not in [r["code"] for r in tumoral["overrideReasons"]]
    assert len(tumoral["overrideReasons"]) == 4


def test_a_snoozing_reason_withholds_the_card_for_that_patient_only(app, client, snooze_log):
    body = request_with_prefetch(SCENARIO)
    risk = cards_by_rule(client, body)[RISK]
    answer = dismiss(client, risk, "already-addressed")
    assert answer == {"stored": 1, "unknownCards": []}
    again = cards_by_rule(client, body)
    assert RISK not in again
    assert RISK in cards_by_rule(client, for_patient(body, "another-patient"))
    # The same patient id on another EHR is another patient.
    assert RISK in cards_by_rule(client, {**body, "fhirServer": "http://127.0.0.1:9/fhir"})
    events = snooze_log()
    assert [e["event"] for e in events] == ["snooze_set", "snooze_applied"]
    for event in events:
        assert (event["rule"], event["reason"]) == (RISK, "already-addressed")
        assert event["until"].startswith("2026-12-01T12:00:00")  # 30 days after the feedback arrived
        assert event["hookInstance"] == body["hookInstance"]
    assert "esrd-dialysis-high-product" not in json.dumps(events)  # never a patient id in the log


def test_the_snooze_outlives_a_restart(tmp_path, rules_dir, client):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "palliative-care")
    restarted = make_app(tmp_path, RULES_DIR=str(rules_dir))
    assert RISK not in cards_by_rule(restarted.test_client(), body)


def test_a_reason_without_a_snooze_changes_nothing(client):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "data-incorrect")
    assert RISK in cards_by_rule(client, body)


def test_a_reason_the_card_did_not_offer_is_stored_flagged_and_snoozes_nothing(app, client):
    body = request_with_prefetch(SCENARIO)
    risk = cards_by_rule(client, body)[RISK]
    # Right code, wrong system: matching is on system and code.
    answer = dismiss(client, risk, "already-addressed", system="urn:somebody-else")
    assert answer == {"stored": 1, "unknownCards": [], "reasonsNotOffered": [risk["uuid"]]}
    assert RISK in cards_by_rule(client, body)
    [row] = [r for r in app.extensions["calcinosis"].store.report() if r.rule_id == RISK]
    assert (row.overridden, row.reasons_not_offered) == (1, 1)


def test_a_dismiss_without_a_reason_is_stored_and_snoozes_nothing(app, client):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], None)
    assert RISK in cards_by_rule(client, body)
    [row] = [r for r in app.extensions["calcinosis"].store.report() if r.rule_id == RISK]
    assert row.overridden == 1


def test_a_worse_finding_lifts_the_snooze(tmp_path, rules_dir, snooze_log):
    # Test-only escalation: the card turns critical at Ca x P >= 90 (not a clinical claim).
    path = rules_dir / "calciphylaxis-risk.yaml"
    path.write_text(path.read_text().replace(
        "  links:\n",
        "  escalate:\n    - indicator: critical\n      when: {fact: ca_x_p, operator: ge, value: 90}\n  links:\n", 1))
    client = make_app(tmp_path, RULES_DIR=str(rules_dir), UUID=lambda: str(uuid.uuid4())).test_client()
    body = request_with_prefetch(SCENARIO)
    risk = cards_by_rule(client, body)[RISK]
    assert risk["indicator"] == "warning"
    dismiss(client, risk, "already-addressed")
    assert RISK not in cards_by_rule(client, body)
    worse = cards_by_rule(client, with_phosphate(body, 9.0))[RISK]  # 10.4 x 9.0 = 93.6
    assert worse["indicator"] == "critical"
    # The snooze is gone, so the original finding shows again too.
    assert RISK in cards_by_rule(client, body)
    assert [e["cause"] for e in snooze_log() if e["event"] == "snooze_lifted"] == ["higher indicator"]


def test_an_edited_rule_lifts_the_snooze(app, client, rules_dir, snooze_log):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "already-addressed")
    assert RISK not in cards_by_rule(client, body)
    path = rules_dir / "calciphylaxis-risk.yaml"
    path.write_text(path.read_text().replace("Calciphylaxis risk: Ca x P", "Calciphylaxis risk - Ca x P"))
    assert app.extensions["calcinosis"].rules.refresh(force=True)
    assert RISK in cards_by_rule(client, body)
    assert [e["cause"] for e in snooze_log() if e["event"] == "snooze_lifted"] == ["rule changed"]


def test_an_edited_shared_definition_the_rule_reads_lifts_the_snooze(app, client, rules_dir, snooze_log):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "already-addressed")
    assert RISK not in cards_by_rule(client, body)
    facts = rules_dir / "facts.yaml"
    text = facts.read_text()
    assert "within: P7D" in text  # the Ca x P pairing window, read by calciphylaxis-risk through ca_x_p
    facts.write_text(text.replace("within: P7D", "within: P3D", 1))
    assert app.extensions["calcinosis"].rules.refresh(force=True)
    assert RISK in cards_by_rule(client, body)
    assert [e["cause"] for e in snooze_log() if e["event"] == "snooze_lifted"] == ["rule changed"]


def test_editing_only_a_rules_description_keeps_the_snooze(app, client, rules_dir):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "already-addressed")
    path = rules_dir / "calciphylaxis-risk.yaml"
    text = path.read_text()
    assert "The card lists other" in text
    path.write_text(text.replace("The card lists other", "The card lists the other"))
    assert app.extensions["calcinosis"].rules.refresh(force=True)
    assert RISK not in cards_by_rule(client, body)


def test_withheld_cards_are_counted_by_rule_in_metrics_and_report(app, client):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "already-addressed")
    for _ in range(3):
        cards_by_rule(client, body)
    metrics = client.get("/metrics").get_data(as_text=True)
    line = next(l for l in metrics.splitlines() if l.startswith("cds_cards_withheld_by_snooze_total{") and f'rule="{RISK}"' in l)
    assert float(line.rsplit(" ", 1)[1]) >= 3  # the registry is process-wide, so other tests may add
    [row] = [r for r in app.extensions["calcinosis"].store.report() if r.rule_id == RISK]
    assert (row.cards_issued, row.overridden, row.withheld) == (1, 1, 3)


def test_the_store_holds_no_raw_patient_id(tmp_path, client):
    body = request_with_prefetch(SCENARIO)
    dismiss(client, cards_by_rule(client, body)[RISK], "already-addressed")
    cards_by_rule(client, body)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    assert b"esrd-dialysis-high-product" not in raw
    assert b"Practitioner/replay" not in raw
