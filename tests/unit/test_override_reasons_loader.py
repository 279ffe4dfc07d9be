"""Override reasons in settings.yaml, a rule's narrower list, its `snooze:` and card `escalate:`."""
from __future__ import annotations

from datetime import timedelta

from fakes import SETTINGS, write_ruleset
from service.engine.loader import load_ruleset
from test_loader_errors import assert_located, errors, line_of, rule_text

REASONS = {
    "system": "urn:example:override-reason",
    "reasons": [
        {"code": "already-addressed", "display": "Already addressed"},
        {"code": "palliative-care", "display": "Palliative care"},
        {"code": "data-incorrect", "display": "Data incorrect"},
    ],
}
WITH_REASONS = {**SETTINGS, "override_reasons": REASONS}


def test_a_rule_offers_every_settings_reason_unless_it_narrows_them(tmp_path):
    narrowed = rule_text("narrow", extra="override_reasons: [palliative-care]\nsnooze:\n  palliative-care: P365D\n")
    root = write_ruleset(tmp_path / "rules", {"calcium-high": rule_text(), "narrow": narrowed}, settings=WITH_REASONS)
    ruleset = load_ruleset(root)
    assert ruleset.rule("calcium-high").override_reasons == ("already-addressed", "palliative-care", "data-incorrect")
    narrow = ruleset.rule("narrow")
    assert narrow.override_reasons == ("palliative-care",)
    assert narrow.snooze == {"palliative-care": timedelta(days=365)}
    assert ruleset.settings.override_codings(narrow.override_reasons) == [
        {"system": "urn:example:override-reason", "code": "palliative-care", "display": "Palliative care"}
    ]


def test_a_reason_settings_do_not_declare_is_located(tmp_path):
    text = rule_text(extra="override_reasons: [already-addressed, palliative-car]\n")
    [error] = errors(tmp_path, {"calcium-high": text}, settings=WITH_REASONS)
    assert_located(error, file="rules/calcium-high.yaml", line=line_of(text, "override_reasons"), rule="calcium-high",
                   field="override_reasons[1]", says="unknown override reason 'palliative-car' (did you mean 'palliative-care'?)")


def test_a_snooze_for_a_reason_the_rule_does_not_offer_is_located(tmp_path):
    text = rule_text(extra="override_reasons: [palliative-care]\nsnooze:\n  already-addressed: P30D\n")
    [error] = errors(tmp_path, {"calcium-high": text}, settings=WITH_REASONS)
    assert_located(error, file="rules/calcium-high.yaml", line=line_of(text, "already-addressed: P30D"), rule="calcium-high",
                   field="snooze.already-addressed", says="not one of this rule's override reasons")


def test_a_snooze_needs_a_day_length_duration(tmp_path):
    text = rule_text(extra="snooze:\n  palliative-care: P1Y\n  already-addressed: P0D\n")
    found = errors(tmp_path, {"calcium-high": text}, settings=WITH_REASONS)
    assert {e.field for e in found} == {"snooze.palliative-care", "snooze.already-addressed"}
    assert any("months and years vary in length" in str(e) for e in found)
    assert any("longer than zero" in str(e) for e in found)


def test_settings_reasons_must_be_codings_with_distinct_codes(tmp_path):
    settings = {**SETTINGS, "override_reasons": {"system": "not a uri", "reasons": [
        {"code": "same", "display": "One"}, {"code": "same", "display": "Two"}, {"code": "no-display"}]}}
    found = errors(tmp_path, {"calcium-high": rule_text()}, settings=settings)
    fields = {e.field for e in found}
    assert {"override_reasons.system", "override_reasons.reasons[2].display"} <= fields
    settings["override_reasons"]["system"] = "urn:ok"
    settings["override_reasons"]["reasons"][2]["display"] = "Fine"
    [error] = errors(tmp_path / "again", {"calcium-high": rule_text()}, settings=settings)
    assert (error.file.endswith("settings.yaml"), error.field) == (True, "override_reasons.reasons[1].code")
    assert "listed twice" in error.message


def test_escalate_must_rise_above_the_cards_indicator(tmp_path):
    card = ("  indicator: warning\n  summary: \"Calcium {calcium} mg/dL is high\"\n  detail:\n    - Calcium is above 10 mg/dL.\n"
            "  escalate:\n    - indicator: warning\n      when: {fact: calcium, operator: gt, value: 12}\n")
    [error] = errors(tmp_path, {"calcium-high": rule_text(card=card)})
    assert error.field == "card.escalate[0].indicator" and "not above the card's indicator 'warning'" in error.message


def test_the_snooze_fingerprint_follows_when_and_card_only(tmp_path):
    base = rule_text()
    fingerprints = []
    for text in (base, base.replace("Calcium above 10 mg/dL.\nwhen", "Calcium over 10 mg/dL.\nwhen"),
                 base.replace("value: 10}", "value: 11}"), base.replace("is high", "is raised")):
        root = write_ruleset(tmp_path / f"r{len(fingerprints)}", {"calcium-high": text})
        fingerprints.append(load_ruleset(root).rule("calcium-high").snooze_fingerprint)
    assert fingerprints[0] == fingerprints[1]  # description edited: same rule for snoozes
    assert len({fingerprints[0], fingerprints[2], fingerprints[3]}) == 3  # when / card edited
