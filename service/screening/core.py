"""Screen patients: rules in, flagged rows out. Pure functions, run in any worker.

A row is {"patient", "rules", "values": {fact: {"value", "date"}}}: the value as a card shows
it, with its unit, and the date of the result it came from (None when it has none).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime

# The resource types the engine reads (service.patient.record); others are skipped before grouping.
ENGINE_TYPES = frozenset({"Patient", "Observation", "Condition"})


class ScreenError(Exception):
    """Something that stops the whole run: no input, an unreachable scheduler, the time limit."""


def time_limit_error(time_limit: float | None) -> ScreenError:
    return ScreenError("the run took longer than the time limit" + (f" ({time_limit:g} s)" if time_limit else ""))


@dataclass
class Tally:
    """What a batch of patients gave; partial tallies from workers are merged."""

    screened: int = 0
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"patient", "error"}
    invalid: Counter = field(default_factory=Counter)  # resource type -> invalid resources skipped

    def merge(self, other: Tally) -> Tally:
        self.screened += other.screened
        self.rows += other.rows
        self.errors += other.errors
        self.invalid.update(other.invalid)
        return self


def _iso(value: date | datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def screen_case(ruleset, case, now: datetime, tally: Tally) -> None:
    """Evaluate one patient and add what it gave to `tally`; an engine failure is one error, not a crash."""
    from service.harness import run_case

    patient = case.patient_id or case.name
    tally.screened += 1
    try:
        result = run_case(ruleset, case, now)
    except Exception as exc:  # noqa: BLE001 - reported, counted, and the run goes on
        tally.errors.append({"patient": patient, "error": f"{type(exc).__name__}: {exc}"})
        return
    for reference in result.record.invalid:
        tally.invalid[reference.split("/")[0]] += 1
    if not result.cards:
        return
    computed = result.evaluation.evaluator.computed()
    values: dict[str, dict] = {}
    for finding in result.evaluation.fired:
        for name in finding.rule.facts_read:
            if name in computed and name not in values:
                values[name] = {"value": computed[name].shown, "date": _iso(computed[name].date)}
    tally.rows.append({"patient": patient, "rules": result.fired, "values": values})


def screen_cases(ruleset, cases, now: datetime | None, fallback: datetime) -> Tally:
    """Evaluate a batch at `now`, else each case's own time, else `fallback`."""
    tally = Tally()
    for case in cases:
        screen_case(ruleset, case, now or case.as_of or fallback, tally)
    return tally


def value_columns(ruleset) -> list[str]:
    """Every fact some rule lists as evidence, in rule order: the screening file's value columns."""
    columns: list[str] = []
    for rule in ruleset.rules:
        columns += [name for name in rule.facts_read if name not in columns]
    return columns
