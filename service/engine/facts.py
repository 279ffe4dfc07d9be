"""Facts: what the rules' named values are for one patient, computed from the record.

Each fact kind (latest Observation, product of two Observations, present Condition,
patient attribute) has one method here; definitions are decided by the evaluator
(`service.engine.evaluate`), which asks for each fact once per evaluation.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator, Sequence

from .durations import format_duration
from .logic import NUMERIC_OPERATORS, Interval
from .model import (
    ConditionFact, DefinitionFact, Expr, ObservationFact, OrderFact, PatientFact, ProcedureFact, ProductFact, RuleSet, SustainedFact,
)
from .record import InvalidResource, ObservationEntry, Reading, Record
from .templates import format_number
from .units import ANALYTES, display_unit

USABLE_OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected"})
PRESENT_CLINICAL_STATUSES = frozenset({"active", "recurrence", "relapse"})
# FHIR R4 required bindings: a code outside them is unreadable, not "some other status".
CLINICAL_STATUSES = PRESENT_CLINICAL_STATUSES | {"inactive", "remission", "resolved"}
VERIFICATION_STATUSES = frozenset({"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"})
EXCLUDED_VERIFICATION_STATUSES = frozenset({"refuted", "entered-in-error"})
PROCEDURE_STATUSES = frozenset({"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"})
# Clocks differ and labs stamp in local time: up to a day ahead is "now", more is a data error.
FUTURE_TOLERANCE = timedelta(days=1)
COMPARATORS = (None, "<", "<=", ">", ">=")
UNDATED = "undated"
FUTURE = "dated in the future"
UNDATABLE = "undated or dated in the future: not used"
MAX_NOTES = 6  # per fact: enough to explain, bounded for patients with thousands of results


@dataclass
class Evidence:
    """One resource a fact's value came from."""

    title: str
    reference: str
    date: datetime | None
    sent: str | None = None  # value and unit exactly as the lab sent them
    value: float | None = None  # normalised
    comparator: str | None = None  # "<", ">"...: the value is a bound

    @property
    def normalised(self) -> str | None:
        """The value in the rule's unit, keeping a bound's sign ('>60 mL/min/1.73 m²'); None if not understood."""
        return None if self.value is None else f"{self.comparator or ''}{format_number(self.value)} {self.unit}"
    unit: str | None = None
    code: str | None = None
    display: str | None = None


@dataclass
class FactValue:
    """A fact's value for this patient: found, absent (no data) or unknown (data we cannot trust)."""

    name: str
    title: str
    state: str
    value: Any = None
    interval: Interval | None = None
    unit: str | None = None
    date: datetime | None = None
    evidence: list[Evidence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attributes: dict[str, "FactValue"] = field(default_factory=dict)
    trace: dict | None = None  # definitions keep how they were decided
    exists: bool | None = None  # when unknown: is there such a result at all (True: yes, its value is unknown)

    @property
    def shown(self) -> str:
        """The value as a card shows it, with its unit and a comparator when not exact."""
        if self.state == "absent":
            return "none"
        if self.state == "unknown" and self.value is None:
            return "unknown"
        if isinstance(self.value, bool):
            return "yes" if self.value else "no"
        if isinstance(self.value, (int, float)):
            text = bound_prefix(self.interval) + format_number(float(self.value))
            return f"{text} {self.unit}" if self.unit else text
        return str(self.value)


def bound_prefix(interval: Interval | None) -> str:
    if interval is None or interval.is_exact:
        return ""
    if math.isinf(interval.high):
        return ">" if interval.low_open else "≥"
    return "<" if interval.high_open else "≤"


class FactComputer:
    """Computes facts from one record at one evaluation time."""

    def __init__(self, ruleset: RuleSet, record: Record, now: datetime, decide: Callable[[Expr], tuple[Any, dict]]) -> None:
        self.ruleset = ruleset
        self.record = record
        self.now = now
        self._decide = decide
        self._candidate_cache: dict[str, tuple[list[ObservationEntry], list[str]]] = {}
        self._entries: dict[str, Sequence[ObservationEntry]] = {}
        self._readings: dict[ObservationEntry, tuple[Reading | None, str | None]] = {}

    def compute(self, name: str) -> FactValue:
        """Compute one fact from the record (definitions are decided by the evaluator)."""
        spec = self.ruleset.facts[name]
        if isinstance(spec, ObservationFact):
            return self._observation(spec)
        if isinstance(spec, ProductFact):
            return self._product(spec)
        if isinstance(spec, ConditionFact):
            return self._condition(spec)
        if isinstance(spec, ProcedureFact):
            return self._procedure(spec)
        if isinstance(spec, SustainedFact):
            return self._sustained(spec)
        if isinstance(spec, PatientFact):
            return self._patient(spec)
        if isinstance(spec, OrderFact):
            return self._order(spec)
        assert isinstance(spec, DefinitionFact)
        result, trace = self._decide(spec.when)
        return FactValue(name, spec.title, "unknown" if result is None else "found", value=result, trace=trace)

    def _candidates(self, spec: ObservationFact, notes: list[str]) -> list[ObservationEntry]:
        """Entries dated within the window with a usable status, newest first (read once per fact)."""
        if spec.name not in self._candidate_cache:
            found_notes: list[str] = []
            entries = list(self._scan(spec.valueset, spec.lookback, found_notes))
            self._candidate_cache[spec.name] = (entries, found_notes)
        entries, found_notes = self._candidate_cache[spec.name]
        notes += found_notes
        return list(entries)

    def _undatable(self, notes: list[str]) -> bool:
        """Say whether `_scan` passed over an undated or future-dated result (its summary note says so)."""
        return any(UNDATABLE in n for n in notes)

    def _scan(self, valueset: str, lookback: timedelta, notes: list[str]) -> Iterator[ObservationEntry]:
        since = self.now - lookback
        skipped = 0
        if valueset not in self._entries:  # several facts may read one value set (eGFR: latest and over time)
            self._entries[valueset] = self.record.observations(valueset)
        entries = self._entries[valueset]

        undatable = 0

        def skip(entry: ObservationEntry, reason: str) -> None:
            nonlocal skipped, undatable
            skipped += 1
            undatable += reason in (UNDATED, FUTURE)
            if skipped <= MAX_NOTES:
                notes.append(f"{entry.reference} not used: {reason}")

        for entry in entries:
            if entry.effective is None:
                break  # undated entries come last; they are reported below
            if entry.effective > self.now + FUTURE_TOLERANCE:
                skip(entry, FUTURE)
            elif entry.effective < since:
                # Entries are newest first: every dated one from here on is older too.
                notes.append(
                    f"older results ignored: {entry.reference} of {entry.effective.date()} "
                    f"is outside the {format_duration(lookback)} look-back"
                )
                break
            elif entry.status not in USABLE_OBSERVATION_STATUSES:
                skip(entry, f"status {entry.status or 'missing'}")
            else:
                yield entry
        # Undated entries sit at the end (newest first, undated last): walk back over them only.
        for entry in reversed(entries):
            if entry.effective is not None:
                break
            skip(entry, UNDATED)
        if skipped > MAX_NOTES:
            notes.append(f"{skipped - MAX_NOTES} more results not used")
        if undatable:
            notes.append(f"{undatable} result(s) {UNDATABLE}")

    def _reading(self, entry: ObservationEntry, notes: list[str]) -> Reading | None:
        """Load an entry's reading, or say why it cannot be used.

        Decided once per entry: several facts scan the same results (latest, paired, over time),
        and a chart may hold thousands of unusable ones.
        """
        known = self._readings.get(entry)
        if known is None:
            outcome = entry.outcome()
            if isinstance(outcome, InvalidResource):
                known = (None, f"{entry.reference} skipped: not valid FHIR R4 ({outcome.error})")
            elif outcome.data_absent:
                known = (None, f"{entry.reference} skipped: dataAbsentReason {outcome.data_absent}")
            elif outcome.value is None:
                known = (None, f"{entry.reference} skipped: no numeric valueQuantity.value")
            else:
                known = (outcome, None)
            self._readings[entry] = known
        reading, why = known
        if why is not None:
            notes.append(why)
        return reading

    def _observation(self, spec: ObservationFact) -> FactValue:
        notes: list[str] = []
        skipped = 0
        for entry in self._candidates(spec, notes):
            local: list[str] = []
            reading = self._reading(entry, local)
            if reading is not None:
                if skipped > MAX_NOTES:
                    notes.append(f"{skipped - MAX_NOTES} more unusable results skipped")
                return self._normalise(spec, entry, reading, notes)
            skipped += 1
            if skipped <= MAX_NOTES:
                notes += local
        if skipped > MAX_NOTES:
            notes.append(f"{skipped - MAX_NOTES} more unusable results skipped")
        if self._undatable(notes):
            # A result exists that may be current: without a trustworthy date, unknown is not "none".
            notes.append(f"no usable dated result in value set {spec.valueset} within {format_duration(spec.lookback)}; "
                         "an undated or future-dated result makes the value unknown")
            return FactValue(spec.name, spec.title, "unknown", unit=display_unit(spec.unit), notes=notes)
        notes.append(f"no usable result in value set {spec.valueset} within {format_duration(spec.lookback)}")
        return FactValue(spec.name, spec.title, "absent", notes=notes)

    def _normalise(self, spec: ObservationFact, entry: ObservationEntry, reading: Reading, notes: list[str]) -> FactValue:
        analyte = ANALYTES[spec.analyte]
        # Exactly as the lab sent it: no rounding, its own unit spelling.
        sent = f"{(reading.comparator or '')}{reading.value:g} {reading.unit_text or reading.unit or '(no unit)'}"
        evidence = Evidence(spec.title, entry.reference, entry.effective, sent=sent, code=f"{entry.system}|{entry.code}", display=entry.display, comparator=reading.comparator)
        factor = analyte.convert(1.0, reading.unit, spec.unit)
        if factor is None:
            notes.append(
                f"{entry.reference}: unit {reading.unit or '(none)'!r} is not a known {spec.analyte} unit, "
                f"so the value is unknown (known: {', '.join(analyte.spellings)})"
            )
            return FactValue(spec.name, spec.title, "unknown", unit=spec.unit, date=entry.effective, evidence=[evidence], notes=notes, exists=True)
        if reading.comparator not in COMPARATORS:
            notes.append(f"{entry.reference}: comparator {reading.comparator!r} is not a FHIR comparator, so the value is unknown")
            return FactValue(spec.name, spec.title, "unknown", unit=spec.unit, date=entry.effective, evidence=[evidence], notes=notes, exists=True)
        value = reading.value * factor
        if spec.plausible is not None and not spec.plausible[0] <= value <= spec.plausible[1]:
            low, high = spec.plausible
            notes.append(
                f"{entry.reference}: implausible: {sent} (plausible {format_number(low)}-{format_number(high)} "
                f"{display_unit(spec.unit)}), so the value is unknown"
            )
            return FactValue(spec.name, spec.title, "unknown", unit=spec.unit, date=entry.effective, evidence=[evidence], notes=notes, exists=True)
        interval = Interval.from_comparator(reading.value, reading.comparator).scaled(factor)
        evidence.value, evidence.unit = value, display_unit(spec.unit)
        if reading.comparator:
            notes.append(f"{entry.reference} is a bound ({sent}), not an exact value")
        fact = FactValue(spec.name, spec.title, "found", value, interval, display_unit(spec.unit), entry.effective, [evidence], notes)
        fact.attributes = self._upper_limit_attributes(spec, reading, interval)
        return fact

    def _upper_limit_attributes(self, spec: ObservationFact, reading: Reading, interval: Interval) -> dict[str, FactValue]:
        analyte = ANALYTES[spec.analyte]
        upper, note = None, ""
        if reading.reference_high is not None:
            upper = analyte.convert(reading.reference_high, reading.reference_high_unit or reading.unit, spec.unit)
            if upper is not None and upper <= 0:
                upper = None  # a high of zero is not a usable limit
            note = "from the lab's reference range" if upper is not None else "reference range not usable"
        if upper is None and spec.default_upper_limit is not None:
            upper, note = spec.default_upper_limit, "default upper limit from the rule set (the lab sent none)"
        if not upper:
            missing = FactValue("upper_limit", spec.title, "unknown", notes=[note or "the lab sent no reference range"])
            return {"upper_limit": missing, "uln_multiple": missing}
        multiple = interval.scaled(1 / upper)
        return {
            "upper_limit": FactValue("upper_limit", spec.title, "found", upper, Interval.exact(upper), display_unit(spec.unit), notes=[note]),
            "uln_multiple": FactValue("uln_multiple", spec.title, "found", multiple.low if math.isfinite(multiple.low) else multiple.high, multiple, "x upper limit", notes=[note]),
        }

    def _product(self, spec: ProductFact) -> FactValue:
        a_spec, b_spec = (self.ruleset.facts[n] for n in spec.of)
        assert isinstance(a_spec, ObservationFact) and isinstance(b_spec, ObservationFact)
        notes: list[str] = []
        a_entries = self._candidates(a_spec, notes)
        b_entries = self._candidates(b_spec, notes)
        pair = self._most_recent_usable_pair(a_entries, b_entries, spec.within, notes) if a_entries and b_entries else None
        if pair is None:
            if not a_entries or not b_entries:
                notes.append(f"needs both {a_spec.title} and {b_spec.title} within their look-back windows")
            else:
                notes.append(f"no usable {a_spec.title} and {b_spec.title} drawn within {format_duration(spec.within)} of each other")
            if self._undatable(notes):
                notes.append("an undated or future-dated result might have made a pair, so the product is unknown")
                return FactValue(spec.name, spec.title, "unknown", unit=spec.unit, notes=notes)
            return FactValue(spec.name, spec.title, "absent", notes=notes)
        (a_entry, a_reading), (b_entry, b_reading) = pair
        a = self._normalise(a_spec, a_entry, a_reading, [])
        b = self._normalise(b_spec, b_entry, b_reading, [])
        evidence = a.evidence + b.evidence
        date = max(a_entry.effective, b_entry.effective)
        if a.state != "found" or b.state != "found":
            notes += [n for n in a.notes + b.notes if n.startswith("Observation/")]
            return FactValue(spec.name, spec.title, "unknown", unit=spec.unit, date=date, evidence=evidence, notes=notes, exists=True)
        interval = _multiply(a.interval, b.interval)
        return FactValue(spec.name, spec.title, "found", a.value * b.value, interval, spec.unit, date, evidence, notes)

    def _most_recent_usable_pair(self, a_entries, b_entries, within, notes: list[str]):
        """The usable pair drawn within `within` of each other whose older member is newest.

        Ties on the older member go to the newest partner. One sweep from newest to oldest:
        each entry, taken as the older member, pairs with the newest usable entry of the other
        side no more than `within` newer. Entries too new for the current one are never needed
        again, and an unusable entry is dropped when first read, so every entry is read at most
        once and passed over at most once: O(n log n) for the merge, whatever the mix of usable
        and unusable results (a search restarted per unusable result was quadratic).
        """
        merged = heapq.merge(
            ((e.effective, 0, e) for e in a_entries), ((e.effective, 1, e) for e in b_entries),
            key=lambda item: item[0], reverse=True,
        )
        seen: tuple[list, list] = ([], [])  # per side, newest first: entries not known to be unusable
        start = [0, 0]  # per side, the first entry of `seen` that may still be a partner
        readings: dict[int, Reading | None] = {}
        skipped = [0]

        def usable(entry: ObservationEntry) -> Reading | None:
            if id(entry) not in readings:
                local: list[str] = []
                readings[id(entry)] = self._reading(entry, local)
                if local:
                    skipped[0] += 1
                    if skipped[0] <= MAX_NOTES:
                        notes.extend(local)
            return readings[id(entry)]

        best = None
        best_time = None
        for time, side, entry in merged:
            if best_time is not None and time < best_time:
                break  # every later entry is older: the best pair is found
            other = 1 - side
            partners = seen[other]
            i = start[other]
            while i < len(partners) and partners[i].effective > time + within:
                i += 1
            while i < len(partners) and usable(partners[i]) is None:
                i += 1
            start[other] = i
            if i == len(partners):
                seen[side].append(entry)  # no partner yet: it may be one for an older entry
                continue
            reading = usable(entry)
            if reading is None:
                continue
            partner = partners[i]
            if best is None or partner.effective > best[2][0].effective:
                best = (side, (entry, reading), (partner, readings[id(partner)]))
                best_time = time
            seen[side].append(entry)
        if skipped[0] > MAX_NOTES:
            notes.append(f"{skipped[0] - MAX_NOTES} more unusable results skipped")
        if best is None:
            return None
        side, older, newer = best
        return (older, newer) if side == 0 else (newer, older)

    def _condition(self, spec: ConditionFact) -> FactValue:
        notes: list[str] = []
        present = []
        unreadable: list[str] = []
        for entry in self.record.conditions(spec.valueset):
            name = f"{entry.reference} ({entry.display or entry.code})"
            try:
                entry.check()
            except InvalidResource as exc:
                unreadable.append(f"{name} cannot be read: {exc.error}")
                continue
            if entry.verification_status is not None and entry.verification_status not in VERIFICATION_STATUSES:
                unreadable.append(f"{name} cannot be read: verification status {entry.verification_status!r} is not a FHIR code")
            elif entry.verification_status in EXCLUDED_VERIFICATION_STATUSES:
                notes.append(f"{name} skipped: {entry.verification_status}")
            elif entry.clinical_status is not None and entry.clinical_status not in CLINICAL_STATUSES:
                unreadable.append(f"{name} cannot be read: clinical status {entry.clinical_status!r} is not a FHIR code")
            elif entry.clinical_status not in PRESENT_CLINICAL_STATUSES:
                notes.append(f"{name} skipped: clinical status {entry.clinical_status or 'missing'}")
            else:
                present.append(entry)
        if not present:
            notes += unreadable[:MAX_NOTES]
            if unreadable:
                # A matching Condition we cannot read may be present: never report it as absent.
                more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
                notes.append(f"{unreadable[0]}{more}: no readable present Condition in value set {spec.valueset}, so unknown")
                return FactValue(spec.name, spec.title, "unknown", notes=notes)
            notes.append(f"no present Condition in value set {spec.valueset}")
            return FactValue(spec.name, spec.title, "absent", notes=notes)
        notes += unreadable[:MAX_NOTES]
        evidence = [
            Evidence(spec.title, e.reference, e.recorded, code=f"{e.system}|{e.code}", display=e.display or e.code)
            for e in present
        ]
        first = present[0]
        fact = FactValue(spec.name, spec.title, "found", first.display or first.code, date=first.recorded, evidence=evidence, notes=notes)
        fact.attributes = {
            "display": FactValue("display", spec.title, "found", first.display or first.code),
            "code": FactValue("code", spec.title, "found", f"{first.system}|{first.code}"),
            "date": FactValue("date", spec.title, "found" if first.recorded else "unknown", first.recorded),
        }
        return fact

    def _order(self, spec: OrderFact) -> FactValue:
        """The draft orders in scope whose code is in the value set; the first one is shown and acted on."""
        matched = list(self.record.orders(spec.valueset))
        unreadable = list(self.record.unreadable_orders())
        notes = [f"{o.reference} could not be read: {o.problem}" for o in unreadable[:MAX_NOTES]]
        if not matched:
            if unreadable:
                # An order we cannot read may be exactly the one the rule is about: unknown, not absent.
                notes.append(f"no readable draft order in value set {spec.valueset}, and {len(unreadable)} draft order(s) could not be read")
                return FactValue(spec.name, spec.title, "unknown", notes=notes)
            notes.append(f"no draft order in value set {spec.valueset}")
            return FactValue(spec.name, spec.title, "absent", notes=notes)
        evidence = []
        for order in matched:
            system, code, display = next(c for c in order.codings if self.ruleset.valuesets[spec.valueset].contains(c[0], c[1]))
            evidence.append(Evidence(spec.title, order.reference, None, code=f"{system}|{code}", display=order.display))
        first = matched[0]
        fact = FactValue(spec.name, spec.title, "found", first.display, evidence=evidence, notes=notes)
        fact.attributes = {
            "display": FactValue("display", spec.title, "found", first.display),
            "id": FactValue("id", spec.title, "found", first.reference),
            "code": FactValue("code", spec.title, "found", evidence[0].code),
        }
        return fact

    def _procedure(self, spec: ProcedureFact) -> FactValue:
        """The most recent completed Procedure in the value set performed within the look-back."""
        notes: list[str] = []
        since = self.now - spec.lookback
        found = []
        uncertain: list[str] = []
        for entry in self.record.procedures(spec.valueset):
            name = f"{entry.reference} ({entry.display or entry.code})"
            try:
                entry.check()
            except InvalidResource as exc:
                uncertain.append(f"{name} cannot be read: {exc.error}")
                continue
            if entry.status not in PROCEDURE_STATUSES:
                uncertain.append(f"{name} cannot be read: status {entry.status!r} is not a FHIR code")
            elif entry.status != "completed":
                if len(notes) < MAX_NOTES:
                    notes.append(f"{name} not used: status {entry.status}")
            elif entry.performed is None:
                uncertain.append(f"{name} not used: {UNDATED}")
            elif entry.performed > self.now + FUTURE_TOLERANCE:
                uncertain.append(f"{name} not used: {FUTURE}")
            elif entry.performed < since:
                if len(notes) < MAX_NOTES:
                    notes.append(f"{name} of {entry.performed.date()} is outside the {format_duration(spec.lookback)} look-back")
            else:
                found.append(entry)
        if not found:
            notes += uncertain[:MAX_NOTES]
            if uncertain:
                more = f" (and {len(uncertain) - 1} more)" if len(uncertain) > 1 else ""
                notes.append(f"{uncertain[0]}{more}: no readable, dated completed Procedure in value set {spec.valueset} "
                             f"within {format_duration(spec.lookback)}, so unknown")
                return FactValue(spec.name, spec.title, "unknown", notes=notes)
            notes.append(f"no completed Procedure in value set {spec.valueset} within {format_duration(spec.lookback)}")
            return FactValue(spec.name, spec.title, "absent", notes=notes)
        latest = max(found, key=lambda e: e.performed)
        evidence = [Evidence(spec.title, latest.reference, latest.performed, code=f"{latest.system}|{latest.code}", display=latest.display or latest.code)]
        fact = FactValue(spec.name, spec.title, "found", latest.display or latest.code, date=latest.performed, evidence=evidence, notes=notes)
        fact.attributes = {
            "display": FactValue("display", spec.title, "found", latest.display or latest.code),
            "code": FactValue("code", spec.title, "found", f"{latest.system}|{latest.code}"),
            "date": FactValue("date", spec.title, "found", latest.performed),
        }
        return fact

    def _sustained(self, spec: SustainedFact) -> FactValue:
        """Whether the observation has stayed below the threshold for at least `apart` (see SustainedFact)."""
        obs = self.ruleset.facts[spec.of]
        assert isinstance(obs, ObservationFact)
        notes: list[str] = []
        threshold = f"{format_number(spec.below)} {display_unit(obs.unit)}"
        run: list[FactValue] = []  # consecutive results below the threshold, newest first
        latest: FactValue | None = None
        skipped = 0
        for entry in self._scan(obs.valueset, spec.lookback, notes):
            local: list[str] = []
            reading = self._reading(entry, local)
            if reading is None:
                skipped += 1
                notes += local if skipped <= MAX_NOTES else []
                continue
            value = self._normalise(obs, entry, reading, local)
            below = NUMERIC_OPERATORS["lt"](value.interval, spec.below) if value.state == "found" else None
            if below is None:
                if not run:  # the latest result cannot be read: the current state is unknown
                    notes += local
                    notes.append(f"the latest {obs.title} cannot be compared with {threshold}, so unknown")
                    return FactValue(spec.name, spec.title, "unknown", evidence=value.evidence, notes=notes)
                notes += local
                break  # continuity cannot be shown past an unreadable result
            if latest is None:
                latest = value
            if not below:
                break  # a result at or above the threshold ends the run
            run.append(value)
            if value.date is not None and run[0].date - value.date >= spec.apart:
                break  # long enough: older results cannot change the answer, so they are not read
        if not run:
            if latest is not None:
                notes.append(f"latest {obs.title} {latest.shown} on {latest.date.date()} is not below {threshold}")
                return FactValue(spec.name, spec.title, "found", False, evidence=latest.evidence, notes=notes)
            if self._undatable(notes):
                notes.append(f"no dated {obs.title} within {format_duration(spec.lookback)}; an undated or future-dated one makes this unknown")
                return FactValue(spec.name, spec.title, "unknown", notes=notes)
            notes.append(f"no usable {obs.title} within {format_duration(spec.lookback)}")
            return FactValue(spec.name, spec.title, "found", False, notes=notes)
        newest, oldest = run[0], run[-1]
        evidence = newest.evidence + (oldest.evidence if oldest is not newest else [])
        span = newest.date - oldest.date
        if span >= spec.apart:
            notes.append(
                f"{obs.title} below {threshold} on {oldest.date.date()} and on {newest.date.date()} ({span.days} days apart, "
                f"at least {format_duration(spec.apart)}), with none at or above it since"
            )
            return FactValue(spec.name, spec.title, "found", True, date=newest.date, evidence=evidence, notes=notes)
        meaning = f"{spec.too_short}: " if spec.too_short else ""
        notes.append(
            f"{meaning}latest {obs.title} {newest.shown} on {newest.date.date()} is below {threshold}, but has not stayed "
            f"below it for {format_duration(spec.apart)} (below since {oldest.date.date()} at most), so unknown"
        )
        return FactValue(spec.name, spec.title, "unknown", date=newest.date, evidence=evidence, notes=notes)

    def _patient(self, spec: PatientFact) -> FactValue:
        patient = self.record.patient()
        if patient is None:
            return FactValue(spec.name, spec.title, "absent", notes=["no Patient resource"])
        evidence = [Evidence(spec.title, f"Patient/{patient.resource_id}", None)]
        if spec.attribute == "sex":
            if not patient.gender:
                return FactValue(spec.name, spec.title, "absent", notes=["Patient.gender not recorded"])
            return FactValue(spec.name, spec.title, "found", patient.gender, evidence=evidence)
        if patient.birth_date is None:
            return FactValue(spec.name, spec.title, "absent", notes=["Patient.birthDate not recorded"])
        today, born = self.now.date(), patient.birth_date
        age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
        return FactValue(spec.name, spec.title, "found", age, Interval.exact(age), "years", evidence=evidence)


def _multiply(a: Interval, b: Interval) -> Interval:
    """Multiply two non-negative lab values that may be bounds (`>8` x 10 is `>80`)."""
    low = max(a.low, 0.0) * max(b.low, 0.0)
    high = 0.0 if 0.0 in (a.high, b.high) else a.high * b.high
    return Interval(low, high, a.low_open or b.low_open, a.high_open or b.high_open)
