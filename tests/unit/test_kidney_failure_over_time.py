"""Kidney failure as the shipped rules define it: a diagnosis, recent dialysis, or eGFR < 15 that lasts.

Each test builds a FakeRecord from plain values and reads the real `kidney_failure` definition
(rules/facts.yaml), so a change to the thresholds or windows there is what these tests check.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fakes import NOW, FakeRecord, condition, days_ago, observation, procedure
from service.engine.evaluate import Evaluator, evaluate
from service.engine.loader import load_ruleset

REAL = load_ruleset(Path(__file__).resolve().parents[2] / "rules")


def egfr(value, days, **kw):
    return observation(value, "mL/min/{1.73_m2}", at=days_ago(days), code="62238-1", **kw)


def record(*, egfrs=(), conditions=(), procedures=()) -> FakeRecord:
    return FakeRecord.indexed(REAL.code_index, observations=egfrs, conditions=conditions, procedures=procedures)


def kidney_failure(rec):
    evaluator = Evaluator(REAL, rec, NOW)
    result, trace = evaluator.test(REAL.facts["kidney_failure"].when)
    return result, evaluator.value_of("egfr_chronically_low"), evaluator.value_of("dialysis_recent")


def test_a_single_egfr_under_15_after_a_normal_one_is_possible_aki_so_unknown():
    result, chronic, _ = kidney_failure(record(egfrs=[egfr(9, 2), egfr(64, 200)]))
    assert result is None
    assert chronic.state == "unknown"
    assert chronic.notes[-1].startswith("possible acute kidney injury: latest eGFR 9")


def test_two_egfrs_under_15_at_least_90_days_apart_are_chronic_kidney_failure():
    result, chronic, _ = kidney_failure(record(egfrs=[egfr(11, 10), egfr(12, 60), egfr(10, 100)]))
    assert result is True
    assert chronic.value is True
    assert "90 days apart" in chronic.notes[-1]


def test_chronic_kidney_failure_cites_the_first_low_egfr_far_enough_back_and_reads_no_older_one():
    # 10 and 120 days ago already span 90 days: the card shows those two; the result from
    # 300 days ago cannot change the answer and is never loaded.
    oldest = egfr(10, 300, rid="egfr-300")
    _, chronic, _ = kidney_failure(record(egfrs=[egfr(11, 10, rid="egfr-10"), egfr(12, 120, rid="egfr-120"), oldest]))
    assert chronic.value is True
    assert "110 days apart" in chronic.notes[-1]
    assert [e.reference for e in chronic.evidence] == ["Observation/egfr-10", "Observation/egfr-120"]
    assert oldest.load_count == []


def test_two_low_egfrs_89_days_apart_are_not_yet_chronic():
    assert kidney_failure(record(egfrs=[egfr(11, 10), egfr(10, 99)]))[0] is None


def test_an_egfr_of_15_or_more_between_two_low_ones_breaks_the_run():
    result, chronic, _ = kidney_failure(record(egfrs=[egfr(11, 10), egfr(40, 50), egfr(10, 120)]))
    assert result is None  # low only since day 10: possible AKI


def test_a_later_egfr_of_15_or_more_ends_chronic_kidney_failure():
    result, chronic, _ = kidney_failure(record(egfrs=[egfr(55, 5), egfr(11, 100), egfr(10, 300)]))
    assert result is False
    assert chronic.value is False


def test_chronic_kidney_failure_does_not_lapse_when_the_egfr_look_back_passes():
    # The last eGFR is 300 days old: outside the eGFR fact's 180 days, so labs are long overdue.
    rec = record(egfrs=[egfr(11, 300), egfr(10, 500)])
    assert kidney_failure(rec)[0] is True
    fired = {f.rule.id for f in evaluate(REAL, rec, NOW).fired}
    assert "ckd-mbd-labs-due" in fired


def test_no_egfr_and_nothing_else_is_no_kidney_failure():
    assert kidney_failure(record())[0] is False


def test_a_completed_dialysis_procedure_in_the_last_90_days_is_kidney_failure():
    result, _, dialysis = kidney_failure(record(egfrs=[egfr(40, 5)], procedures=[procedure(performed=days_ago(30))]))
    assert result is True
    assert dialysis.state == "found"


def test_an_old_dialysis_procedure_with_a_recovered_egfr_is_no_kidney_failure():
    result, _, dialysis = kidney_failure(record(egfrs=[egfr(48, 10)], procedures=[procedure(performed=days_ago(200))]))
    assert result is False
    assert dialysis.state == "absent"


@pytest.mark.parametrize("status", ["in-progress", "not-done", "entered-in-error"])
def test_a_dialysis_procedure_that_was_not_completed_does_not_count(status):
    assert kidney_failure(record(egfrs=[egfr(48, 10)], procedures=[procedure(status=status, performed=days_ago(3))]))[0] is False


def test_an_unreadable_or_undated_dialysis_procedure_makes_kidney_failure_unknown():
    assert kidney_failure(record(egfrs=[egfr(48, 10)], procedures=[procedure(invalid="performedDateTime: bad")]))[0] is None
    assert kidney_failure(record(egfrs=[egfr(48, 10)], procedures=[procedure(performed=None)]))[0] is None


def test_a_dialysis_procedure_dated_days_ahead_is_not_used():
    _, _, dialysis = kidney_failure(record(procedures=[procedure(performed=NOW + timedelta(days=5), rid="p-future")]))
    assert dialysis.state == "unknown"
    assert "Procedure/p-future (Renal dialysis) not used: dated in the future" in dialysis.notes


def test_an_unreadable_kidney_failure_condition_keeps_the_without_kidney_failure_card_away():
    calcium = observation(12.5, at=days_ago(2), code="17861-6")
    phosphate = observation(7.0, at=days_ago(2), code="2777-1")
    rec = FakeRecord.indexed(
        REAL.code_index,
        observations=[calcium, phosphate, egfr(60, 2)],
        conditions=[condition("N18.6", invalid="clinicalStatus: not a CodeableConcept", rid="esrd")],
    )
    fired = {f.rule.id for f in evaluate(REAL, rec, NOW).fired}
    assert "metastatic-calcification" not in fired


def test_an_implausible_egfr_is_never_read_as_kidney_failure():
    result, chronic, _ = kidney_failure(record(egfrs=[egfr(-3, 2), egfr(60, 30)]))
    assert result is None
    assert any("implausible: -3" in n for n in chronic.notes)
