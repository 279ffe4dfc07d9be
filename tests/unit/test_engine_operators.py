"""Every condition operator, true and false; absent and unknown facts; comparator bounds; Kleene logic.

Rules are written as YAML into a temporary folder, loaded with `load_ruleset`, and
evaluated over a `FakeRecord` (no FHIR JSON, no I/O).
"""
from __future__ import annotations

import itertools
from datetime import date

import pytest

from fakes import NOW, FakeRecord, condition, days_ago, load, observation, patient, rule_doc
from service.engine.evaluate import evaluate
from service.engine.logic import Interval, all_of, any_of, negate


def decide(tmp_path, when: dict, record: FakeRecord, **kwargs):
    """Load a one-rule set with this condition and return its finding."""
    ruleset = load(tmp_path / "rules", {"probe": rule_doc("probe", when)}, **kwargs)
    (finding,) = evaluate(ruleset, record, NOW).findings
    return finding


def calcium(value, unit="mg/dL", **kwargs) -> FakeRecord:
    return FakeRecord(observations={"calcium": [observation(value, unit, at=days_ago(1), **kwargs)]})


def leaf(fact: str, operator: str, value=None) -> dict:
    node = {"fact": fact, "operator": operator}
    if value is not None:
        node["value"] = value
    return node


# --- numeric operators -------------------------------------------------------------------------

NUMERIC_CASES = [
    ("gt", 10, 10.1, True),
    ("gt", 10, 10.0, False),
    ("ge", 10, 10.0, True),
    ("ge", 10, 9.9, False),
    ("lt", 10, 9.9, True),
    ("lt", 10, 10.0, False),
    ("le", 10, 10.0, True),
    ("le", 10, 10.1, False),
    ("eq", 10, 10.0, True),
    ("eq", 10, 10.5, False),
    ("ne", 10, 10.5, True),
    ("ne", 10, 10.0, False),
]


@pytest.mark.parametrize(("operator", "threshold", "actual", "expected"), NUMERIC_CASES)
def test_numeric_operator_compares_the_latest_value(tmp_path, operator, threshold, actual, expected):
    finding = decide(tmp_path, leaf("calcium", operator, threshold), calcium(actual))
    assert finding.result is expected
    assert finding.fired is expected


@pytest.mark.parametrize(("actual", "expected"), [(8.5, True), (9.4, True), (10.5, True), (8.49, False), (10.51, False)])
def test_between_includes_both_ends_and_nothing_outside(tmp_path, actual, expected):
    finding = decide(tmp_path, leaf("calcium", "between", [8.5, 10.5]), calcium(actual))
    assert finding.result is expected


def test_comparison_uses_the_value_converted_to_the_fact_unit(tmp_path):
    # 2.6 mmol/L is 10.42 mg/dL: above 10 only after conversion.
    assert decide(tmp_path, leaf("calcium", "gt", 10), calcium(2.6, "mmol/L")).result is True


# --- presence --------------------------------------------------------------------------------------


def test_present_is_true_for_an_observation_with_a_value(tmp_path):
    assert decide(tmp_path, leaf("calcium", "present"), calcium(9.0)).result is True


def test_present_is_false_when_there_is_no_observation(tmp_path):
    assert decide(tmp_path, leaf("calcium", "present"), FakeRecord()).result is False


def test_absent_is_true_when_there_is_no_observation(tmp_path):
    assert decide(tmp_path, leaf("calcium", "absent"), FakeRecord()).result is True


def test_absent_is_false_for_an_observation_with_a_value(tmp_path):
    assert decide(tmp_path, leaf("calcium", "absent"), calcium(9.0)).result is False


def test_present_on_a_condition_fact_sees_an_active_condition(tmp_path):
    record = FakeRecord(conditions={"kidney": [condition("N18.6")]})
    assert decide(tmp_path, leaf("kidney_dx", "present"), record).result is True


def test_absent_on_a_condition_fact_without_conditions_is_true(tmp_path):
    assert decide(tmp_path, leaf("kidney_dx", "absent"), FakeRecord()).result is True


def test_present_is_true_and_absent_false_for_a_value_in_an_unknown_unit(tmp_path):
    # Unknown is not "no data": the lab did send a result.
    assert decide(tmp_path / "a", leaf("calcium", "present"), calcium(9.0, "mmol/kg")).result is True
    assert decide(tmp_path / "b", leaf("calcium", "absent"), calcium(9.0, "mmol/kg")).result is False


# --- text and boolean operators ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "value", "gender", "expected"),
    [
        ("eq", "female", "female", True),
        ("eq", "female", "male", False),
        ("eq", "female", "Female", True),  # case-insensitive
        ("ne", "female", "male", True),
        ("ne", "female", "female", False),
        ("in", ["female", "other"], "other", True),
        ("in", ["female", "other"], "male", False),
    ],
)
def test_text_operator_compares_words_case_insensitively(tmp_path, operator, value, gender, expected):
    record = FakeRecord(patient=patient(date(1960, 1, 1), gender))
    assert decide(tmp_path, leaf("sex", operator, value), record).result is expected


@pytest.mark.parametrize(
    ("value", "record", "expected"),
    [
        (True, FakeRecord(conditions={"kidney": [condition("N18.6")]}), True),
        (True, FakeRecord(observations={"egfr": [observation(40, "mL/min/{1.73_m2}", at=days_ago(1))]}), False),
        (False, FakeRecord(observations={"egfr": [observation(40, "mL/min/{1.73_m2}", at=days_ago(1))]}), True),
        (False, FakeRecord(observations={"egfr": [observation(12, "mL/min/{1.73_m2}", at=days_ago(1))]}), False),
    ],
)
def test_is_compares_a_definition_with_true_or_false(tmp_path, value, record, expected):
    assert decide(tmp_path, leaf("kidney_failure", "is", value), record).result is expected


# --- absent facts: every comparison is false -----------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        leaf("calcium", "gt", 1),
        leaf("calcium", "ge", 1),
        leaf("calcium", "lt", 100),
        leaf("calcium", "le", 100),
        leaf("calcium", "eq", 9),
        leaf("calcium", "ne", 9),
        leaf("calcium", "between", [0, 100]),
        leaf("sex", "eq", "female"),
        leaf("sex", "ne", "female"),
        leaf("sex", "in", ["female", "male"]),
        leaf("pth.uln_multiple", "gt", 0),
    ],
    ids=lambda n: f"{n['fact']}-{n['operator']}",
)
def test_comparison_with_an_absent_fact_is_false(tmp_path, node):
    finding = decide(tmp_path, node, FakeRecord())
    assert finding.result is False
    assert finding.trace["actual"] == "none"


def test_not_of_a_comparison_with_an_absent_fact_is_true(tmp_path):
    assert decide(tmp_path, {"not": leaf("calcium", "gt", 10)}, FakeRecord()).result is True


# --- unknown: a unit the engine does not understand ----------------------------------------------------------


@pytest.mark.parametrize("operator", ["gt", "ge", "lt", "le", "eq", "ne"])
def test_comparison_with_a_value_in_an_unknown_unit_is_unknown_and_does_not_fire(tmp_path, operator):
    finding = decide(tmp_path, leaf("calcium", operator, 10), calcium(12.0, "mmol/kg"))
    assert finding.result is None
    assert finding.fired is False
    assert "mmol/kg" in finding.trace["why"]


def test_between_with_a_value_in_an_unknown_unit_is_unknown(tmp_path):
    assert decide(tmp_path, leaf("calcium", "between", [8, 11]), calcium(9.0, "mEq/L")).result is None


def test_value_without_any_unit_is_unknown(tmp_path):
    assert decide(tmp_path, leaf("calcium", "gt", 10), calcium(12.0, None)).result is None


def test_not_of_unknown_stays_unknown_and_does_not_fire(tmp_path):
    finding = decide(tmp_path, {"not": leaf("calcium", "gt", 10)}, calcium(12.0, "mmol/kg"))
    assert finding.result is None
    assert not finding.fired


def test_definition_built_on_an_unknown_value_makes_is_unknown(tmp_path):
    record = FakeRecord(observations={"egfr": [observation(10, "ml/s", at=days_ago(1))]})
    assert decide(tmp_path / "t", leaf("kidney_failure", "is", True), record).result is None
    assert decide(tmp_path / "f", leaf("kidney_failure", "is", False), record).result is None


# --- comparator bounds (valueQuantity.comparator) ------------------------------------------------------------------


def egfr(value, comparator) -> FakeRecord:
    return FakeRecord(observations={"egfr": [observation(value, "mL/min/{1.73_m2}", at=days_ago(1), comparator=comparator)]})


@pytest.mark.parametrize(
    ("comparator", "value", "operator", "threshold", "expected"),
    [
        (">", 60, "ge", 60, True),  # ">60" is at least 60
        (">", 60, "lt", 15, False),  # ">60" is never below 15
        (">", 60, "gt", 60, True),
        (">", 60, "gt", 90, None),  # could be 61 or 120
        (">=", 60, "gt", 60, None),  # could be exactly 60
        (">=", 60, "ge", 60, True),
        ("<", 5, "gt", 3, None),  # "<5" could be 4 or 2
        ("<", 5, "lt", 5, True),
        ("<", 5, "ge", 5, False),
        ("<=", 5, "lt", 5, None),
        ("<=", 5, "le", 5, True),
        (">", 60, "eq", 60, False),
        (">", 60, "eq", 70, None),
        (">", 60, "ne", 50, True),
        (">", 60, "between", [10, 50], False),
        (">", 60, "between", [50, 120], None),
    ],
)
def test_comparator_bound_settles_a_comparison_only_when_every_value_it_allows_agrees(
    tmp_path, comparator, value, operator, threshold, expected
):
    finding = decide(tmp_path, leaf("egfr", operator, threshold), egfr(value, comparator))
    assert finding.result is expected


def test_bound_value_is_shown_with_its_comparator_in_the_trace(tmp_path):
    finding = decide(tmp_path, leaf("egfr", "ge", 60), egfr(60, ">"))
    assert finding.trace["actual"].startswith(">60")


def test_comparator_bound_is_converted_with_its_unit(tmp_path):
    # "<2.0 mmol/L" calcium is below 8.016 mg/dL: settles "lt 8.1" but not "lt 8".
    record = calcium(2.0, "mmol/L", comparator="<")
    assert decide(tmp_path / "a", leaf("calcium", "lt", 8.1), record).result is True
    assert decide(tmp_path / "b", leaf("calcium", "lt", 7.9), calcium(2.0, "mmol/L", comparator="<")).result is None


# --- Kleene logic ------------------------------------------------------------------------------------------

T, F, U = True, False, None
TRUTHS = [T, F, U]

AND = {(T, T): T, (T, F): F, (T, U): U, (F, T): F, (F, F): F, (F, U): F, (U, T): U, (U, F): F, (U, U): U}
OR = {(T, T): T, (T, F): T, (T, U): T, (F, T): T, (F, F): F, (F, U): U, (U, T): T, (U, F): U, (U, U): U}


@pytest.mark.parametrize(("a", "b"), list(itertools.product(TRUTHS, TRUTHS)))
def test_all_of_follows_the_kleene_and_table(a, b):
    assert all_of([a, b]) is AND[(a, b)]


@pytest.mark.parametrize(("a", "b"), list(itertools.product(TRUTHS, TRUTHS)))
def test_any_of_follows_the_kleene_or_table(a, b):
    assert any_of([a, b]) is OR[(a, b)]


@pytest.mark.parametrize(("a", "expected"), [(T, F), (F, T), (U, U)])
def test_negate_follows_the_kleene_not_table(a, expected):
    assert negate(a) is expected


def test_empty_all_is_true_and_empty_any_is_false():
    assert all_of([]) is True
    assert any_of([]) is False


# Leaves that are True, False and unknown for the record below.
LEAVES = {
    T: leaf("calcium", "gt", 10),  # 12 mg/dL
    F: leaf("phosphate", "gt", 10),  # 4 mg/dL
    U: leaf("pth", "gt", 10),  # unit not understood
}


def kleene_record() -> FakeRecord:
    return FakeRecord(
        observations={
            "calcium": [observation(12, "mg/dL", at=days_ago(1))],
            "phosphate": [observation(4, "mg/dL", at=days_ago(1))],
            "pth": [observation(300, "pg/L", at=days_ago(1))],
        }
    )


@pytest.mark.parametrize(("a", "b"), list(itertools.product(TRUTHS, TRUTHS)))
def test_rule_with_all_combines_its_conditions_by_kleene_and(tmp_path, a, b):
    finding = decide(tmp_path, {"all": [LEAVES[a], LEAVES[b]]}, kleene_record())
    assert finding.result is AND[(a, b)]
    assert finding.fired is (AND[(a, b)] is True)


@pytest.mark.parametrize(("a", "b"), list(itertools.product(TRUTHS, TRUTHS)))
def test_rule_with_any_combines_its_conditions_by_kleene_or(tmp_path, a, b):
    finding = decide(tmp_path, {"any": [LEAVES[a], LEAVES[b]]}, kleene_record())
    assert finding.result is OR[(a, b)]


@pytest.mark.parametrize(("a", "expected"), [(T, F), (F, T), (U, U)])
def test_rule_with_not_negates_by_kleene_not(tmp_path, a, expected):
    assert decide(tmp_path, {"not": LEAVES[a]}, kleene_record()).result is expected


# --- the interval arithmetic underneath -------------------------------------------------------------------------


def test_interval_from_comparator_keeps_open_and_closed_ends():
    assert Interval.from_comparator(5, "<") == Interval(float("-inf"), 5, True, True)
    assert Interval.from_comparator(5, "<=") == Interval(float("-inf"), 5, True, False)
    assert Interval.from_comparator(5, ">") == Interval(5, float("inf"), True, True)
    assert Interval.from_comparator(5, ">=") == Interval(5, float("inf"), False, True)
    assert Interval.from_comparator(5, None).is_exact
