"""Card content rendered from templates: values, bounds, absent lists, values used, widths."""
from __future__ import annotations

import pytest

from fakes import NOW, FakeRecord, condition, days_ago, load, observation, rule_doc
from service.engine.cards import render_card
from service.engine.evaluate import evaluate
from service.engine.templates import WIDTHS, Placeholder, format_number, format_value

ALWAYS = {"fact": "calcium", "operator": "present"}


def card_for(tmp_path, summary: str, record: FakeRecord, *, detail=None, card_extra=None):
    doc = rule_doc("probe", ALWAYS, summary=summary)
    if detail is not None:
        doc["card"]["detail"] = detail
    doc["card"].update(card_extra or {})
    ruleset = load(tmp_path / "rules", {"probe": doc})
    evaluation = evaluate(ruleset, record, NOW)
    (finding,) = evaluation.fired
    return render_card(finding, evaluation.evaluator, ruleset)


def calcium(value=10.4, unit="mg/dL", **kw) -> dict:
    return {"calcium": [observation(value, unit, at=days_ago(2), **kw)]}


def test_summary_shows_the_normalised_value_and_unit(tmp_path):
    card = card_for(tmp_path, "Calcium {calcium} {calcium.unit} on {calcium.date}", FakeRecord(observations=calcium(2.6, "mmol/L")))
    assert card.summary == f"Calcium 10.4 mg/dL on {days_ago(2).date().isoformat()}"


def test_summary_shows_a_bound_with_its_comparator(tmp_path):
    card = card_for(tmp_path, "Calcium {calcium}", FakeRecord(observations=calcium(12, comparator=">")))
    assert card.summary == "Calcium >12"


def test_summary_shows_the_value_as_the_lab_sent_it(tmp_path):
    card = card_for(tmp_path, "Calcium {calcium.sent}", FakeRecord(observations=calcium(2.6, "mmol/L")))
    assert card.summary == "Calcium 2.6 mmol/L"


def test_absent_placeholder_lists_the_titles_of_missing_facts(tmp_path):
    card = card_for(tmp_path, "Missing: {absent:phosphate,pth,albumin}", FakeRecord(observations=calcium()))
    assert card.summary == "Missing: Phosphate, Intact PTH and Albumin"


def test_absent_placeholder_says_none_when_nothing_is_missing(tmp_path):
    card = card_for(tmp_path, "Missing: {absent:calcium}", FakeRecord(observations=calcium()))
    assert card.summary == "Missing: none"


def test_detail_line_with_when_is_shown_only_when_it_holds(tmp_path):
    detail = ["Always.", {"text": "Very high.", "when": {"fact": "calcium", "operator": "gt", "value": 12}}]
    assert "Very high." not in card_for(tmp_path / "a", "s", FakeRecord(observations=calcium(11)), detail=detail).detail
    assert "Very high." in card_for(tmp_path / "b", "s", FakeRecord(observations=calcium(13)), detail=detail).detail


def test_detail_line_with_an_unknown_when_is_not_shown(tmp_path):
    detail = ["Always.", {"text": "PTH raised.", "when": {"fact": "pth.uln_multiple", "operator": "gt", "value": 1}}]
    record = FakeRecord(observations={**calcium(), "pth": [observation(300, "pg/mL", at=days_ago(2))]})  # no reference range
    assert "PTH raised." not in card_for(tmp_path, "s", record, detail=detail).detail


def test_values_used_list_each_value_with_its_date_and_resource(tmp_path):
    card = card_for(tmp_path, "s", FakeRecord(observations=calcium(2.6, "mmol/L", rid="ca-7")))
    assert "**Values used**" in card.detail
    assert f"Total calcium: 10.4 mg/dL on {days_ago(2).date().isoformat()} (sent as 2.6 mmol/L; Observation/ca-7)" in card.detail


def test_disclaimer_from_settings_ends_the_detail(tmp_path):
    card = card_for(tmp_path, "s", FakeRecord(observations=calcium()))
    assert card.detail.endswith("_Test disclaimer._")


def test_condition_display_from_the_record_is_escaped_for_markdown(tmp_path):
    record = FakeRecord(observations=calcium(), conditions={"skin": [condition("L97.1", display="Ulcer *deep* [x]")]})
    card = card_for(tmp_path, "s", record, detail=["Lesion: {skin_lesion.display}"])
    assert "Lesion: Ulcer \\*deep\\* \\[x\\]" in card.detail


def test_action_with_when_is_proposed_only_when_it_holds(tmp_path):
    suggestions = [
        {
            "label": "Order labs",
            "actions": [
                {"type": "create", "description": "Phosphate", "when": {"fact": "phosphate", "operator": "absent"}, "resource": {"resourceType": "ServiceRequest"}},
                {"type": "create", "description": "Calcium", "when": {"fact": "calcium", "operator": "absent"}, "resource": {"resourceType": "ServiceRequest"}},
            ],
        }
    ]
    card = card_for(tmp_path, "s", FakeRecord(observations=calcium()), card_extra={"suggestions": suggestions})
    (suggestion,) = card.suggestions
    assert [a.description for a in suggestion.actions] == ["Phosphate"]
    assert card.selection == "at-most-one"


def test_long_display_is_clamped_to_its_width_with_an_ellipsis():
    text = format_value("x" * 100, Placeholder("skin_lesion", "display", None))
    assert len(text) == WIDTHS["display"]
    assert text.endswith("…")


@pytest.mark.parametrize("value", [0.0, 1.0, 9.87654, 74.94, 1234567.0, 123456789.0, 1e12, 1e300, -5.5, -1e12])
def test_number_renders_within_the_value_width(value):
    assert len(format_number(value)) <= WIDTHS["value"]


def test_large_negative_number_renders_within_the_value_width():
    assert len(format_number(-1e100)) <= WIDTHS["value"]


def test_bound_too_wide_for_its_placeholder_is_not_cut_mid_number(tmp_path):
    record = FakeRecord(observations={"pth": [observation(12345.6789, "pg/mL", at=days_ago(2), comparator=">")], **calcium()})
    card = card_for(tmp_path, "PTH {pth:.3f}", record)
    assert "…" not in card.summary


def test_condition_placeholder_without_attribute_shows_the_display_like_display_does(tmp_path):
    record = FakeRecord(observations=calcium(), conditions={"skin": [condition("L97.1", display="Ulcer of lower limb")]})
    card = card_for(tmp_path, "Lesion: {skin_lesion}", record)
    assert card.summary == "Lesion: Ulcer of lower limb"
