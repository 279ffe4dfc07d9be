"""Test doubles for the rule engine: a Record built from plain values, and small rule sets on disk.

`FakeRecord` implements `service.engine.record.Record` without any FHIR JSON, so engine
tests do no I/O and need neither Flask nor fhir.resources. It counts how often each
value set is read, so tests can check that facts are computed once.

`write_ruleset` writes a small rule folder (settings.yaml, facts.yaml, valuesets/,
one file per rule) into a temporary directory for `load_ruleset`.
"""
from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

from service.engine.record import ConditionEntry, InvalidResource, ObservationEntry, PatientInfo, ProcedureEntry, Reading
from service.engine.valuesets import CodeIndex

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

_ids = itertools.count(1)


def days_ago(days: float, *, now: datetime = NOW) -> datetime:
    return now - timedelta(days=days)


# --- entries -------------------------------------------------------------------------------------


def observation(
    value: float | None = None,
    unit: str | None = "mg/dL",
    *,
    at: datetime | None = NOW,
    status: str | None = "final",
    comparator: str | None = None,
    data_absent: str | None = None,
    reference_high: float | None = None,
    reference_high_unit: str | None = None,
    invalid: str | None = None,
    rid: str | None = None,
    system: str = LOINC,
    code: str = "17861-6",
    display: str | None = None,
    unit_text: str | None = None,
) -> ObservationEntry:
    """An Observation entry; `invalid` makes loading it raise InvalidResource with that message."""
    rid = rid or f"obs-{next(_ids)}"
    reading = Reading(
        value=None if value is None else float(value),
        comparator=comparator,
        unit=unit,
        unit_text=unit_text if unit_text is not None else unit,
        data_absent=data_absent,
        reference_high=reference_high,
        reference_high_unit=reference_high_unit,
    )
    loads: list[int] = []

    def load(source: object, resource_id: str) -> Reading:
        loads.append(1)
        if invalid is not None:
            raise InvalidResource("Observation", rid, invalid)
        return reading

    entry = ObservationEntry(rid, status, at, system, code, display, source=None, load=load)
    entry.load_count = loads  # type: ignore[attr-defined]  # how many times the resource was "validated"
    return entry


def condition(
    code: str = "N18.6",
    *,
    system: str = ICD10CM,
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    display: str | None = None,
    recorded: datetime | None = None,
    invalid: str | None = None,
    rid: str | None = None,
) -> ConditionEntry:
    rid = rid or f"cond-{next(_ids)}"

    def validate(source: object, resource_id: str) -> None:
        if invalid is not None:
            raise InvalidResource("Condition", rid, invalid)

    return ConditionEntry(rid, clinical, verification, system, code, display, recorded or days_ago(365), source=None, validate=validate)


def procedure(
    code: str = "265764009",
    *,
    system: str = SNOMED,
    status: str | None = "completed",
    performed: datetime | None = None,
    invalid: str | None = None,
    rid: str | None = None,
) -> ProcedureEntry:
    rid = rid or f"proc-{next(_ids)}"

    def validate(source: object, resource_id: str) -> None:
        if invalid is not None:
            raise InvalidResource("Procedure", rid, invalid)

    return ProcedureEntry(rid, status, performed, system, code, "Renal dialysis", source=None, validate=validate)


def patient(birth_date: date | None = None, gender: str | None = None, rid: str = "pat-1") -> PatientInfo:
    return PatientInfo(rid, birth_date, gender)


# --- the record -------------------------------------------------------------------------------------


def _newest_first(entries: Iterable[ObservationEntry]) -> list[ObservationEntry]:
    floor = datetime.min.replace(tzinfo=UTC)
    return sorted(entries, key=lambda e: (e.effective is not None, e.effective or floor), reverse=True)


class FakeRecord:
    """A patient's data keyed by value set id, as `service.patient.record.PatientRecord` serves it."""

    def __init__(
        self,
        observations: Mapping[str, Sequence[ObservationEntry]] | None = None,
        conditions: Mapping[str, Sequence[ConditionEntry]] | None = None,
        patient: PatientInfo | None = None,
        procedures: Mapping[str, Sequence[ProcedureEntry]] | None = None,
    ) -> None:
        self._observations = {vs: _newest_first(entries) for vs, entries in (observations or {}).items()}
        self._procedures = {vs: list(entries) for vs, entries in (procedures or {}).items()}
        self._conditions = {vs: list(entries) for vs, entries in (conditions or {}).items()}
        self._patient = patient
        self.observation_reads: Counter[str] = Counter()
        self.condition_reads: Counter[str] = Counter()
        self.patient_reads = 0

    @classmethod
    def indexed(
        cls,
        code_index: CodeIndex,
        observations: Iterable[ObservationEntry] = (),
        conditions: Iterable[ConditionEntry] = (),
        patient: PatientInfo | None = None,
        procedures: Iterable[ProcedureEntry] = (),
    ) -> "FakeRecord":
        """Place entries under every value set their system + code belongs to (as the real record does)."""
        obs: dict[str, list[ObservationEntry]] = {}
        conds: dict[str, list[ConditionEntry]] = {}
        for entry in observations:
            for vs in code_index.match(entry.system, entry.code):
                obs.setdefault(vs, []).append(entry)
        for entry in conditions:
            for vs in code_index.match(entry.system, entry.code):
                conds.setdefault(vs, []).append(entry)
        procs: dict[str, list[ProcedureEntry]] = {}
        for entry in procedures:
            for vs in code_index.match(entry.system, entry.code):
                procs.setdefault(vs, []).append(entry)
        return cls(obs, conds, patient, procs)

    def observations(self, valueset_id: str) -> Sequence[ObservationEntry]:
        self.observation_reads[valueset_id] += 1
        return self._observations.get(valueset_id, [])

    def conditions(self, valueset_id: str) -> Sequence[ConditionEntry]:
        self.condition_reads[valueset_id] += 1
        return self._conditions.get(valueset_id, [])

    def procedures(self, valueset_id: str) -> Sequence[ProcedureEntry]:
        return self._procedures.get(valueset_id, [])

    def patient(self) -> PatientInfo | None:
        self.patient_reads += 1
        return self._patient

    def orders(self, valueset_id: str) -> Sequence:
        return []  # no draft orders: patient-view data

    def unreadable_orders(self) -> Sequence:
        return []


# --- rule sets on disk ------------------------------------------------------------------------------

SETTINGS = {
    "topic_system": "urn:test:rule",
    "source_label": "Test rules",
    "disclaimer": "Test disclaimer.",
}

VALUESETS: dict[str, list[tuple[str, str]]] = {
    "calcium": [(LOINC, "17861-6"), (LOINC, "2000-8")],
    "phosphate": [(LOINC, "2777-1"), (LOINC, "14879-1")],
    "pth": [(LOINC, "2731-8"), (LOINC, "14866-8")],
    "egfr": [(LOINC, "33914-3"), (LOINC, "98979-8")],
    "albumin": [(LOINC, "1751-7")],
    "kidney": [(SNOMED, "46177005"), (ICD10CM, "N18.6"), (ICD10CM, "Z99.2")],
    "skin": [(ICD10CM, "L97*"), (SNOMED, "46742003")],
}

FACTS: dict[str, dict] = {
    "calcium": {"title": "Total calcium", "observation": "calcium", "analyte": "calcium", "unit": "mg/dL", "lookback": "P90D", "plausible": [1, 25]},
    "phosphate": {"title": "Phosphate", "observation": "phosphate", "analyte": "phosphate", "unit": "mg/dL", "lookback": "P90D", "plausible": [0.2, 25]},
    "pth": {"title": "Intact PTH", "observation": "pth", "analyte": "pth", "unit": "pg/mL", "lookback": "P180D", "plausible": [1, 5000]},
    "egfr": {"title": "eGFR", "observation": "egfr", "analyte": "egfr", "unit": "mL/min/{1.73_m2}", "lookback": "P180D", "plausible": [0, 250]},
    "albumin": {"title": "Albumin", "observation": "albumin", "analyte": "albumin", "unit": "g/dL", "lookback": "P90D", "plausible": [0.5, 7]},
    "ca_x_p": {"title": "Calcium x phosphate", "product": ["calcium", "phosphate"], "within": "P7D", "unit": "mg²/dL²"},
    "kidney_dx": {"title": "Kidney failure diagnosis", "condition": "kidney"},
    "skin_lesion": {"title": "Skin lesion", "condition": "skin"},
    "sex": {"title": "Sex", "patient": "sex"},
    "age": {"title": "Age", "patient": "age"},
    "kidney_failure": {
        "title": "Kidney failure",
        "definition": {"any": [{"fact": "kidney_dx", "operator": "present"}, {"fact": "egfr", "operator": "lt", "value": 15}]},
    },
}


def rule_doc(rule_id: str, when: dict, *, summary: str = "Rule fired", **extra: object) -> dict:
    """A minimal valid rule document."""
    doc: dict = {
        "id": rule_id,
        "title": f"Rule {rule_id}",
        "description": "A rule for tests.",
        "when": when,
        "card": {"indicator": "info", "summary": summary, "detail": ["Detail."]},
    }
    doc.update(extra)
    return doc


def _dump(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")


def write_ruleset(
    root: Path,
    rules: Mapping[str, dict | str],
    *,
    facts: Mapping[str, dict] | None = None,
    extra_facts: Mapping[str, dict] | None = None,
    valuesets: Mapping[str, list[tuple[str, str]]] | None = None,
    settings: dict | str | None = SETTINGS,
    facts_text: str | None = None,
    valueset_texts: Mapping[str, str] | None = None,
) -> Path:
    """Write a rule folder: `rules` maps a file stem to a rule document (dict) or raw YAML text."""
    root.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        _dump(root / "settings.yaml", settings)
    for vs_id, codes in (VALUESETS if valuesets is None else valuesets).items():
        _dump(
            root / "valuesets" / f"{vs_id}.yaml",
            {"id": vs_id, "title": f"Value set {vs_id}", "codes": [{"system": s, "code": c} for s, c in codes]},
        )
    for name, text in (valueset_texts or {}).items():
        _dump(root / "valuesets" / f"{name}.yaml", text)
    if facts_text is not None:
        _dump(root / "facts.yaml", facts_text)
    else:
        _dump(root / "facts.yaml", {"facts": {**(FACTS if facts is None else facts), **(extra_facts or {})}})
    for stem, doc in rules.items():
        _dump(root / f"{stem}.yaml", doc)
    return root


def load(root: Path, rules: Mapping[str, dict | str], **kwargs):
    """Write a rule folder and load it."""
    from service.engine.loader import load_ruleset

    return load_ruleset(write_ruleset(root, rules, **kwargs))
