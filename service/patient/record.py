"""A patient's resources indexed by value set once per request.

Building the record walks the raw JSON once and keeps only resources whose code is
in a value set some rule reads; nothing is validated until a rule asks for its value
(see `service.engine.record`). Invalid resources are counted and logged by type and
id, never fatal.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable

from service.engine.record import ConditionEntry, InvalidResource, ObservationEntry, PatientInfo, Reading
from service.engine.valuesets import CodeIndex

from .dates import parse_date, parse_datetime
from .validation import validation_error

log = logging.getLogger(__name__)

UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


class PatientRecord:
    def __init__(self, code_index: CodeIndex, patient_id: str | None = None, *, log_context: dict | None = None) -> None:
        self.code_index = code_index
        self.patient_id = patient_id
        self.invalid: dict[str, str] = {}  # "Type/id" -> first validation problem
        self.other_patient = 0
        self._log_context = log_context or {}
        self._observations: dict[str, list[ObservationEntry]] = defaultdict(list)
        self._conditions: dict[str, list[ConditionEntry]] = defaultdict(list)
        self._patient: PatientInfo | None = None
        self._patient_checked = False
        self._patient_raw: dict | None = None
        self._seen: set[tuple[str, str]] = set()
        self._sorted: set[str] = set()
        self._anonymous = 0

    # --- building ----------------------------------------------------------------------------

    def add_all(self, resources: Iterable[object]) -> None:
        """Add resources (not bundles) from prefetch or the FHIR server."""
        for resource in resources:
            if isinstance(resource, dict):
                self.add(resource)

    def add(self, resource: dict) -> None:
        """Index one resource if a rule can use it; skip other types."""
        kind = resource.get("resourceType")
        if kind not in ("Observation", "Condition", "Patient"):
            return
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            self._anonymous += 1
            rid = f"(no id #{self._anonymous})"
        if (kind, rid) in self._seen:  # the same resource from two keys or pages
            return
        self._seen.add((kind, rid))
        try:
            if kind == "Patient":
                self._add_patient(resource, rid)
            elif self._belongs_to_patient(resource):
                (self._add_observation if kind == "Observation" else self._add_condition)(resource, rid)
        except (AttributeError, TypeError, ValueError, KeyError):
            # The shape is too broken to even read its code: report it like any invalid resource.
            self._invalid(kind, rid, validation_error(resource) or "unreadable structure")

    def _belongs_to_patient(self, resource: dict) -> bool:
        reference = (resource.get("subject") or {}).get("reference")
        if not self.patient_id or not isinstance(reference, str) or "Patient/" not in reference:
            return True
        if reference.rsplit("Patient/", 1)[1].split("/")[0] == self.patient_id:
            return True
        self.other_patient += 1
        return False

    def _matches(self, resource: dict) -> list[tuple[dict, frozenset[str]]]:
        codings = (resource.get("code") or {}).get("coding") or []
        return [(c, ids) for c in codings if (ids := self.code_index.match(c.get("system"), c.get("code")))]

    def _add_observation(self, resource: dict, rid: str) -> None:
        matches = self._matches(resource)
        if not matches:
            return
        coding = matches[0][0]
        effective = parse_datetime(
            resource.get("effectiveDateTime")
            or (resource.get("effectivePeriod") or {}).get("start")
            or resource.get("effectiveInstant")
            or resource.get("issued")
        )
        entry = ObservationEntry(
            rid, resource.get("status"), effective, coding["system"], str(coding["code"]), coding.get("display"),
            load=lambda: self._reading(resource, rid),
        )
        for vs_id in frozenset().union(*(ids for _, ids in matches)):
            self._observations[vs_id].append(entry)
            self._sorted.discard(vs_id)

    def _add_condition(self, resource: dict, rid: str) -> None:
        matches = self._matches(resource)
        if not matches:
            return
        coding = matches[0][0]
        entry = ConditionEntry(
            rid,
            _status(resource.get("clinicalStatus"), CLINICAL),
            _status(resource.get("verificationStatus"), VERIFICATION),
            coding["system"], str(coding["code"]), coding.get("display") or (resource.get("code") or {}).get("text"),
            parse_datetime(resource.get("recordedDate") or resource.get("onsetDateTime")),
            validate=lambda: self._validate(resource, "Condition", rid),
        )
        for vs_id in frozenset().union(*(ids for _, ids in matches)):
            self._conditions[vs_id].append(entry)

    def _add_patient(self, resource: dict, rid: str) -> None:
        if self.patient_id and rid != self.patient_id:
            self.other_patient += 1
            return
        self._patient_raw = resource

    # --- validation, lazily -------------------------------------------------------------------

    def _invalid(self, kind: str, rid: str, problem: str) -> InvalidResource:
        key = f"{kind}/{rid}"
        if key not in self.invalid:
            self.invalid[key] = problem
            log.warning("invalid FHIR resource skipped", extra={"event": "invalid_resource", "resource": key, "problem": problem, **self._log_context})
        return InvalidResource(kind, rid, problem)

    def _validate(self, resource: dict, kind: str, rid: str) -> None:
        problem = validation_error(resource)
        if problem:
            raise self._invalid(kind, rid, problem)

    def _reading(self, resource: dict, rid: str) -> Reading:
        self._validate(resource, "Observation", rid)
        quantity = resource.get("valueQuantity") or {}
        code, text = quantity.get("code"), quantity.get("unit")
        # Trust `code` as a unit only when it is UCUM (or unlabelled); a local code system's codes are not units.
        unit = code if code and quantity.get("system") in (None, UCUM) else text
        absent = resource.get("dataAbsentReason")
        high = next((r["high"] for r in resource.get("referenceRange") or () if isinstance(r, dict) and r.get("high")), None) or {}
        high_unit = high.get("code") if high.get("code") and high.get("system") in (None, UCUM) else high.get("unit")
        return Reading(
            value=_number(quantity.get("value")),
            comparator=quantity.get("comparator"),
            unit=unit,
            unit_text=text or code,
            data_absent=_coded_text(absent) if absent else None,
            reference_high=_number(high.get("value")),
            reference_high_unit=high_unit,
        )

    # --- the engine's view (service.engine.record.Record) ---------------------------------------

    def observations(self, valueset_id: str) -> list[ObservationEntry]:
        entries = self._observations.get(valueset_id, [])
        if valueset_id not in self._sorted:
            entries.sort(key=lambda e: (e.effective is not None, e.effective or 0), reverse=True)
            self._sorted.add(valueset_id)
        return entries

    def conditions(self, valueset_id: str) -> list[ConditionEntry]:
        return self._conditions.get(valueset_id, [])

    def patient(self) -> PatientInfo | None:
        if not self._patient_checked:
            self._patient_checked = True
            raw = self._patient_raw
            if raw is not None:
                problem = validation_error(raw)
                if problem:
                    self._invalid("Patient", raw.get("id") or "(no id)", problem)
                else:
                    self._patient = PatientInfo(raw.get("id", ""), parse_date(raw.get("birthDate")), raw.get("gender"))
        return self._patient

    @property
    def counts(self) -> dict[str, int]:
        """How many indexed resources of each kind (for logs and replay output)."""
        return {
            "observations": len({id(e) for entries in self._observations.values() for e in entries}),
            "conditions": len({id(e) for entries in self._conditions.values() for e in entries}),
        }


def _number(value: object) -> float | None:
    """A JSON number, or None for null, text or booleans (which pass FHIR validation as decimals)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _status(concept: object, system: str) -> str | None:
    if not isinstance(concept, dict):
        return None
    codings = concept.get("coding") or []
    preferred = [c for c in codings if c.get("system") == system] or codings
    return preferred[0].get("code") if preferred else None


def _coded_text(concept: object) -> str:
    if isinstance(concept, dict):
        coding = (concept.get("coding") or [{}])[0]
        return coding.get("code") or concept.get("text") or "unknown"
    return "unknown"


def resources_in(value: object) -> list[dict]:
    """The resources in a prefetch value: a Bundle's entries, or the resource itself."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        out = []
        for entry in value.get("entry") or ():
            resource = entry.get("resource") if isinstance(entry, dict) else None
            # Search bundles may carry OperationOutcomes as entries (search.mode "outcome"): not patient data.
            if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
                out.append(resource)
        return out
    return [value]
