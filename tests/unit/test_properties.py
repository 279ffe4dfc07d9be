"""Properties over many generated inputs: conversions round-trip, comparisons are sound, and the
real rules never raise on valid patient data and always render short summaries."""
from __future__ import annotations

import math
import operator
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from fakes import ICD10CM, NOW, FakeRecord, condition, observation, patient
from service.engine.cards import SUMMARY_LIMIT, render_card
from service.engine.evaluate import evaluate
from service.engine.facts import _multiply
from service.engine.loader import SUMMARY_MAX, load_ruleset
from service.engine.logic import NUMERIC_OPERATORS, Interval
from service.engine.units import ANALYTES

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL = load_ruleset(Path(__file__).resolve().parents[2] / "rules")

# --- unit conversions ------------------------------------------------------------------------------------

UNIT_PAIRS = sorted((name, unit) for name, analyte in ANALYTES.items() for unit in analyte.factors)
VALUES = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(value=VALUES, analyte=st.sampled_from(["calcium", "phosphate"]))
def test_mmol_to_mg_and_back_returns_the_same_value(value, analyte):
    a = ANALYTES[analyte]
    mg = a.convert(value, "mmol/L", "mg/dL")
    assert mg > value  # both factors are above 1
    assert a.convert(mg, "mg/dL", "mmol/L") == pytest.approx(value, rel=1e-12)


@PROPERTY
@given(value=VALUES, pair=st.sampled_from(UNIT_PAIRS), data=st.data())
def test_conversion_between_any_two_units_of_an_analyte_round_trips(value, pair, data):
    name, source = pair
    analyte = ANALYTES[name]
    target = data.draw(st.sampled_from(sorted(analyte.factors)))
    there = analyte.convert(value, source, target)
    assert there is not None and there > 0
    assert analyte.convert(there, target, source) == pytest.approx(value, rel=1e-12)


@PROPERTY
@given(value=VALUES, pair=st.sampled_from(UNIT_PAIRS))
def test_unit_spelling_case_does_not_change_the_conversion(value, pair):
    name, unit = pair
    analyte = ANALYTES[name]
    assert analyte.convert(value, unit.upper(), analyte.canonical) == analyte.convert(value, unit, analyte.canonical)


# --- comparisons with bounds are sound -----------------------------------------------------------------------

COMPARATORS = [None, "<", "<=", ">", ">="]
PY_OPERATORS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le, "eq": operator.eq, "ne": operator.ne}
SMALL = st.integers(min_value=-20, max_value=20).map(float)


def member(interval: Interval, draw) -> float:
    """Draw a value the interval allows."""
    if interval.is_exact:
        return interval.low
    low = interval.low if math.isfinite(interval.low) else interval.high - 50
    high = interval.high if math.isfinite(interval.high) else interval.low + 50
    x = draw(st.floats(min_value=low, max_value=high, allow_nan=False))
    assume(not (x == interval.low and interval.low_open) and not (x == interval.high and interval.high_open))
    return x


@PROPERTY
@given(value=SMALL, comparator=st.sampled_from(COMPARATORS), threshold=SMALL, op=st.sampled_from(sorted(PY_OPERATORS)), data=st.data())
def test_settled_comparison_holds_for_every_value_the_bound_allows(value, comparator, threshold, op, data):
    interval = Interval.from_comparator(value, comparator)
    result = NUMERIC_OPERATORS[op](interval, threshold)
    x = member(interval, data.draw)
    if result is not None:
        assert PY_OPERATORS[op](x, threshold) is result
    if comparator is None:
        assert result is PY_OPERATORS[op](value, threshold)


@PROPERTY
@given(
    a=st.tuples(st.floats(0, 30), st.sampled_from(COMPARATORS)),
    b=st.tuples(st.floats(0, 30), st.sampled_from(COMPARATORS)),
    data=st.data(),
)
def test_product_interval_contains_every_product_of_allowed_values(a, b, data):
    ia, ib = Interval.from_comparator(*a), Interval.from_comparator(*b)
    product = _multiply(ia, ib)
    x = max(member(ia, data.draw), 0.0)
    y = max(member(ib, data.draw), 0.0)
    assert product.low <= x * y <= product.high


# --- random patient data over the real rules -------------------------------------------------------------------

OBSERVATION_CODES = sorted({(vs_id, s, c) for vs_id, vs in REAL.valuesets.items() for s, c in vs.exact if s == "http://loinc.org"})
CONDITION_CODES = sorted(
    {(s, c) for vs in REAL.valuesets.values() for s, c in vs.exact if s != "http://loinc.org"}
    | {(s, p + "9") for vs in REAL.valuesets.values() for s, p in vs.prefixes}
)
ANALYTE_OF = {f.valueset: f.analyte for f in REAL.facts.values() if hasattr(f, "analyte")}
ALL_UNITS = sorted({u for a in ANALYTES.values() for u in a.factors} | {a.canonical for a in ANALYTES.values()})
JUNK_UNITS = [None, "", "mmol/kg", "%", "U/L", "mEq/L", "Mg/dl", "MMOL/L", "mL/min/1.73 m2", "pg/ml ", "{ratio}"]
STATUSES = ["final", "amended", "corrected", "preliminary", "cancelled", "entered-in-error", "registered", None]
CLINICAL = ["active", "recurrence", "relapse", "inactive", "remission", "resolved", None]
VERIFICATION = ["confirmed", "provisional", "unconfirmed", "differential", "refuted", "entered-in-error", None]

LAB_VALUES = st.one_of(
    st.floats(min_value=0, max_value=20),
    st.floats(min_value=0, max_value=2000),
    st.floats(min_value=-1e6, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.none(),
)
WHEN = st.one_of(st.none(), st.integers(min_value=-30 * 86400, max_value=400 * 86400).map(lambda s: NOW - timedelta(seconds=s)))


@st.composite
def observations(draw):
    vs_id, system, code = draw(st.sampled_from(OBSERVATION_CODES))
    analyte = ANALYTE_OF.get(vs_id, "calcium")
    unit = draw(st.one_of(st.sampled_from(sorted(ANALYTES[analyte].factors)), st.sampled_from(ALL_UNITS), st.sampled_from(JUNK_UNITS)))
    return observation(
        draw(LAB_VALUES),
        unit,
        at=draw(WHEN),
        status=draw(st.sampled_from(STATUSES)),
        comparator=draw(st.sampled_from(COMPARATORS)),
        data_absent=draw(st.sampled_from([None, None, None, "not-performed", "error"])),
        reference_high=draw(st.one_of(st.none(), st.floats(min_value=0, max_value=500))),
        reference_high_unit=draw(st.sampled_from([None, None, "pg/mL", "pmol/L", "mg/dL", "junk"])),
        invalid=draw(st.sampled_from([None] * 9 + ["invalid resource"])),
        system=system,
        code=code,
        display=draw(st.sampled_from([None, "Calcium", "x" * 200])),
    )


@st.composite
def conditions(draw):
    system, code = draw(st.sampled_from(CONDITION_CODES))
    return condition(
        code,
        system=system,
        clinical=draw(st.sampled_from(CLINICAL)),
        verification=draw(st.sampled_from(VERIFICATION)),
        display=draw(st.sampled_from([None, "Ulcer", "Ulcer of skin with necrosis of muscle, " * 5, "*_[x](y)<b>"])),
        recorded=draw(WHEN),
        invalid=draw(st.sampled_from([None] * 9 + ["invalid resource"])),
    )


PATIENTS = st.one_of(
    st.none(),
    st.builds(
        patient,
        birth_date=st.one_of(st.none(), st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 12, 31))),
        gender=st.sampled_from(["female", "male", "other", "unknown", None]),
    ),
)


@st.composite
def usable_observation(draw, vs_id: str):
    """A result that is likely to be used: recent, final, in a unit of its analyte (values still random)."""
    system, code = draw(st.sampled_from(sorted(c for c in REAL.valuesets[vs_id].exact if c[0] == "http://loinc.org")))
    return observation(
        draw(st.one_of(st.floats(min_value=5, max_value=15), st.integers(min_value=1, max_value=200), LAB_VALUES)),
        draw(st.sampled_from(sorted(ANALYTES[ANALYTE_OF[vs_id]].factors))),
        at=NOW - timedelta(hours=draw(st.integers(min_value=0, max_value=24 * 10))),
        status=draw(st.sampled_from(["final", "amended", "corrected"])),
        comparator=draw(st.sampled_from([None, None, None, "<", "<=", ">", ">="])),
        reference_high=draw(st.one_of(st.none(), st.floats(min_value=0, max_value=500))),
        system=system,
        code=code,
    )


@st.composite
def records(draw) -> FakeRecord:
    # Mostly include a usable result of each lab, so the Ca x P rules get to fire and render.
    usable = [draw(usable_observation(vs)) for vs in REAL.observation_valuesets() if draw(st.sampled_from([True, True, True, False]))]
    return FakeRecord.indexed(
        REAL.code_index,
        observations=usable + draw(st.lists(observations(), max_size=20)),
        conditions=draw(st.lists(conditions(), max_size=6)),
        patient=draw(PATIENTS),
    )


def test_generated_codes_reach_every_value_set_the_rules_read():
    observed = {vs for vs, _, _ in OBSERVATION_CODES}
    assert set(REAL.observation_valuesets()) <= observed
    matched = {vs for s, c in CONDITION_CODES for vs in REAL.code_index.match(s, c)}
    assert set(REAL.condition_valuesets()) <= matched
    assert any(s == ICD10CM for s, _ in CONDITION_CODES)


@PROPERTY
@given(record=records())
def test_valid_patient_data_never_makes_evaluating_the_real_rules_raise(record):
    evaluation = evaluate(REAL, record, NOW)
    assert [f.rule.id for f in evaluation.findings] == [r.id for r in REAL.rules]
    for finding in evaluation.findings:
        assert finding.result in (True, False, None)
        assert finding.fired == (finding.result is True and finding.suppressed_by is None)
    for finding in evaluation.fired:
        card = render_card(finding, evaluation.evaluator, REAL)
        assert card.detail


@PROPERTY
@given(record=records())
def test_card_summaries_from_the_real_rules_stay_under_140_characters(record):
    evaluation = evaluate(REAL, record, NOW)
    for finding in evaluation.fired:
        event(f"fired {finding.rule.id}")
        # The loader's proof: the template never renders wider than its widest placeholders allow ...
        raw = finding.rule.card.summary.render(evaluation.evaluator.lookup, markdown=False)
        assert len(raw) <= SUMMARY_MAX
        # ... so the card never needs its safety truncation.
        card = render_card(finding, evaluation.evaluator, REAL)
        assert card.summary == raw
        assert len(card.summary) < 140
    assert SUMMARY_LIMIT == SUMMARY_MAX == 139
