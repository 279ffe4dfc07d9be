"""Strict checks of exactly the elements the engine reads, with FHIR R4's types and value sets.

Full validation with fhir.resources costs ~150-250 µs a resource, more than everything else
a small chart needs (docs/performance.md). The engine reads a dozen elements, so these are
checked here, each by one row of `ROWS` that names the FHIR element it checks; a failure
makes the resource unreadable. Elements the engine does not read are not looked at: a
calcium result with a malformed `performer` still counts, as with HAPI FHIR's lenient parser.

The rows follow FHIR R4 (v4.0.1, hl7.org/fhir/R4): the primitive types' regular expressions
(datatypes.html; "Dates SHALL be valid dates"), the complex types the engine reads, the
required value sets of the status elements (valueset-observation-status, -event-status,
-condition-clinical, -condition-ver-status, -quantity-comparator, -administrative-gender,
-request-status, -request-intent, -request-priority, -medicationrequest-status,
-medicationrequest-intent), at most one type of a choice element
[x], and the invariants on what is read (obs-3, obs-6, sqty-1, per-1, con-5).
fhir.resources stays the authority on whole resources (`CDS_VALIDATION=full`, `replay
--validate`, the fixture tests and every resource the service proposes).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Callable

from .dates import parse_datetime

# A check returns None when the value is well formed, else the problem: ": <message>", or
# ".<sub-element>: <message>" when it is inside the value. The row puts its element in front.
Check = Callable[[object], "str | None"]

# --- primitive types (FHIR R4 datatypes.html) -------------------------------------------------

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_DAY = r"(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])"
DATE_TIME_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{_TIME}{_ZONE})?)?)?")
DATE_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
INSTANT_RE = re.compile(rf"{_YEAR}-{_DAY}T{_TIME}{_ZONE}")
ID_RE = re.compile(r"[A-Za-z0-9\-\.]{1,64}")
CODE_RE = re.compile(r"[^\s]+(\s[^\s]+)*")
URI_RE = re.compile(r"\S*")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _string(value: object) -> str | None:
    if not isinstance(value, str):
        return f": {_show(value)} is not a string"
    if not value.strip():
        return ": empty string"
    return None


def _pattern(regex: re.Pattern, type_name: str) -> Check:
    def check(value: object) -> str | None:
        if not isinstance(value, str) or not regex.fullmatch(value):
            return f": {_show(value)} is not a FHIR {type_name}"
        return None
    return check


def _real_date(text: str) -> bool:
    """FHIR: "Dates SHALL be valid dates" (no 31 April); the regular expressions allow them.

    Only the day of the month needs checking: the expressions already bound hours, minutes,
    seconds and zones."""
    if len(text) < 10:
        return True
    try:
        date.fromisoformat(text[:10])
    except ValueError:
        return False
    return True


def _dated(regex: re.Pattern, type_name: str) -> Check:
    shape = _pattern(regex, type_name)

    def check(value: object) -> str | None:
        problem = shape(value)
        if problem is None and not _real_date(value):  # type: ignore[arg-type]
            return f": {_show(value)} is not a valid {type_name}"
        return problem
    return check


ID = _pattern(ID_RE, "id")
CODE = _pattern(CODE_RE, "code")
URI = _pattern(URI_RE, "uri")
STRING = _string
DATE_TIME = _dated(DATE_TIME_RE, "dateTime")
DATE = _dated(DATE_RE, "date")
INSTANT = _dated(INSTANT_RE, "instant")


def DECIMAL(value: object) -> str | None:
    """A JSON number (not text, not true/false) that is finite as a double."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f": {_show(value)} is not a JSON number"
    try:
        if math.isfinite(float(value)):
            return None
    except OverflowError:
        pass
    return f": {_show(value)} is out of range"


def BOOLEAN(value: object) -> str | None:
    return None if isinstance(value, bool) else f": {_show(value)} is not true or false"


def INTEGER(value: object) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else f": {_show(value)} is not an integer"


def ANY(value: object) -> str | None:
    """A type the engine does not read inside (only whether it is there): any JSON value but null."""
    return None


# --- value sets (FHIR R4 required bindings) -----------------------------------------------------

OBSERVATION_STATUS = frozenset({"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"})
EVENT_STATUS = frozenset({"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"})
CONDITION_CLINICAL = frozenset({"active", "recurrence", "relapse", "inactive", "remission", "resolved"})
CONDITION_VERIFICATION = frozenset({"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"})
QUANTITY_COMPARATOR = frozenset({"<", "<=", ">=", ">"})
ADMINISTRATIVE_GENDER = frozenset({"male", "female", "other", "unknown"})
REQUEST_STATUS = frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"})
REQUEST_INTENT = frozenset({"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"})
REQUEST_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})
MEDICATION_REQUEST_STATUS = frozenset({"active", "on-hold", "cancelled", "completed", "entered-in-error", "stopped", "draft", "unknown"})
MEDICATION_REQUEST_INTENT = frozenset({"proposal", "plan", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"})
CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


def code_in(allowed: frozenset[str], name: str) -> Check:
    def check(value: object) -> str | None:
        if value not in allowed:
            return f": {_show(value)} is not in {name} ({', '.join(sorted(allowed))})"
        return None
    return check


# --- complex types --------------------------------------------------------------------------------

def _object(fields: dict[str, Check]) -> Check:
    """A JSON object whose listed properties (when present, not null) pass their checks; others are not read."""
    def check(value: object) -> str | None:
        if not isinstance(value, dict):
            return f": {_show(value)} is not an object"
        for key, field_check in fields.items():
            item = value.get(key)
            if item is not None:
                problem = field_check(item)
                if problem:
                    return f".{key}{problem}"
        return None
    return check


def list_of(item_check: Check) -> Check:
    def check(value: object) -> str | None:
        if not isinstance(value, list):
            return f": {_show(value)} is not a list"
        for i, item in enumerate(value):
            problem = item_check(item)
            if problem:
                return f"[{i}]{problem}"
        return None
    return check


CODING = _object({"system": URI, "version": STRING, "code": CODE, "display": STRING, "userSelected": BOOLEAN})
CODEABLE_CONCEPT = _object({"coding": list_of(CODING), "text": STRING})
REFERENCE = _object({"reference": STRING, "type": URI, "display": STRING})
_QUANTITY_FIELDS = {"value": DECIMAL, "unit": STRING, "system": URI, "code": CODE}
QUANTITY = _object({**_QUANTITY_FIELDS, "comparator": code_in(QUANTITY_COMPARATOR, "QuantityComparator")})
_SIMPLE_QUANTITY_SHAPE = _object(_QUANTITY_FIELDS)


def SIMPLE_QUANTITY(value: object) -> str | None:
    """A Quantity without a comparator (sqty-1)."""
    if isinstance(value, dict) and value.get("comparator") is not None:
        return ".comparator: not allowed in a SimpleQuantity (sqty-1)"
    return _SIMPLE_QUANTITY_SHAPE(value)


_PERIOD_SHAPE = _object({"start": DATE_TIME, "end": DATE_TIME})


def PERIOD(value: object) -> str | None:
    """start and end dateTimes; end not before start (per-1), compared when both name a day
    (a partial end such as "2023" covers the whole year)."""
    problem = _PERIOD_SHAPE(value)
    if problem is None and len(value.get("start") or "") >= 10 and len(value.get("end") or "") >= 10:  # type: ignore[union-attr]
        start, end = parse_datetime(value["start"]), parse_datetime(value["end"])  # type: ignore[index]
        if start and end and end < start:
            return ": end is before start (per-1)"
    return problem


_RANGE_SHAPE = _object({"low": SIMPLE_QUANTITY, "high": SIMPLE_QUANTITY, "type": CODEABLE_CONCEPT, "text": STRING})


def REFERENCE_RANGE(value: object) -> str | None:
    """low and high SimpleQuantities; at least low, high or text (obs-3)."""
    problem = _RANGE_SHAPE(value)
    if problem is None and not any(value.get(k) is not None for k in ("low", "high", "text")):  # type: ignore[union-attr]
        return ": needs low, high or text (obs-3)"
    return problem


def bound_concept(system: str, allowed: frozenset[str], name: str) -> Check:
    """A CodeableConcept with a required binding: a coding from `system`, every such code in the value set."""
    def check(value: object) -> str | None:
        problem = CODEABLE_CONCEPT(value)
        if problem:
            return problem
        codes = [c.get("code") for c in value.get("coding") or () if c.get("system") == system]  # type: ignore[union-attr]
        if not codes:
            return f": no coding from {system} (required binding to {name})"
        wrong = next((c for c in codes if c not in allowed), None)
        if wrong is not None:
            return f": {_show(wrong)} is not in {name} ({', '.join(sorted(allowed))})"
        return None
    return check


# --- the table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One element the engine reads: its FHIR path, its JSON properties (several for a choice [x]) and their checks."""

    element: str
    properties: dict[str, Check]
    required: bool = False

    def __post_init__(self) -> None:
        # Precomputed: this runs for every resource a rule reads (~10 a request), so it stays cheap.
        object.__setattr__(self, "_keys", frozenset(self.properties))
        object.__setattr__(self, "_missing", f"{self.element}: required, missing" if self.required else None)
        object.__setattr__(self, "_single", next(iter(self.properties)) if len(self.properties) == 1 else None)

    def problem(self, resource: dict) -> str | None:
        key = self._single
        if key is not None:  # a plain element
            value = resource.get(key)
            if value is None:
                return self._missing
            problem = self.properties[key](value)
            return None if problem is None else self.element + problem
        present = [k for k in self._keys & resource.keys() if resource[k] is not None]  # a choice element [x]
        if not present:
            return self._missing
        if len(present) > 1:
            return f"{self.element}: only one of {', '.join(sorted(present))} may be present"
        key = present[0]
        problem = self.properties[key](resource[key])
        return None if problem is None else f"{self.element.split('.')[0]}.{key}{problem}"


@dataclass(frozen=True)
class Invariant:
    """A FHIR invariant over elements the engine reads; `holds(resource)` is False when violated."""

    key: str
    element: str
    holds: Callable[[dict], bool]
    message: str

    def problem(self, resource: dict) -> str | None:
        return None if self.holds(resource) else f"{self.element}: {self.message} ({self.key})"


def _choice(prefix: str, **types: Check) -> dict[str, Check]:
    return {prefix + name: check for name, check in types.items()}


_VALUE = _choice(
    "value", Quantity=QUANTITY, CodeableConcept=CODEABLE_CONCEPT, String=STRING, Boolean=BOOLEAN, Integer=INTEGER,
    Range=ANY, Ratio=ANY, SampledData=ANY, Time=ANY, DateTime=DATE_TIME, Period=PERIOD,
)

ROWS: dict[str, tuple[Row | Invariant, ...]] = {
    "Observation": (
        Row("Observation.id", {"id": ID}),
        Row("Observation.status", {"status": code_in(OBSERVATION_STATUS, "ObservationStatus")}, required=True),
        Row("Observation.code", {"code": CODEABLE_CONCEPT}, required=True),
        Row("Observation.subject", {"subject": REFERENCE}),
        Row("Observation.effective[x]", _choice("effective", DateTime=DATE_TIME, Period=PERIOD, Timing=ANY, Instant=INSTANT)),
        Row("Observation.issued", {"issued": INSTANT}),
        Row("Observation.value[x]", _VALUE),
        Row("Observation.dataAbsentReason", {"dataAbsentReason": CODEABLE_CONCEPT}),
        Invariant("obs-6", "Observation.dataAbsentReason", lambda r: r.get("dataAbsentReason") is None or not any(r[k] is not None for k in _VALUE.keys() & r.keys()),
                  "only allowed when there is no value[x]"),
        Row("Observation.referenceRange", {"referenceRange": list_of(REFERENCE_RANGE)}),
    ),
    "Condition": (
        Row("Condition.id", {"id": ID}),
        Row("Condition.clinicalStatus", {"clinicalStatus": bound_concept(CLINICAL_SYSTEM, CONDITION_CLINICAL, "ConditionClinicalStatusCodes")}),
        Row("Condition.verificationStatus", {"verificationStatus": bound_concept(VERIFICATION_SYSTEM, CONDITION_VERIFICATION, "ConditionVerificationStatus")}),
        Invariant("con-5", "Condition.clinicalStatus", lambda r: r.get("clinicalStatus") is None or not _has_code(r.get("verificationStatus"), VERIFICATION_SYSTEM, "entered-in-error"),
                  "must be absent when verificationStatus is entered-in-error"),
        Row("Condition.code", {"code": CODEABLE_CONCEPT}),
        Row("Condition.subject", {"subject": REFERENCE}, required=True),
        Row("Condition.onset[x]", _choice("onset", DateTime=DATE_TIME, Age=QUANTITY, Period=PERIOD, Range=ANY, String=STRING)),
        Row("Condition.recordedDate", {"recordedDate": DATE_TIME}),
    ),
    "Procedure": (
        Row("Procedure.id", {"id": ID}),
        Row("Procedure.status", {"status": code_in(EVENT_STATUS, "EventStatus")}, required=True),
        Row("Procedure.code", {"code": CODEABLE_CONCEPT}),
        Row("Procedure.subject", {"subject": REFERENCE}, required=True),
        Row("Procedure.performed[x]", _choice("performed", DateTime=DATE_TIME, Period=PERIOD, String=STRING, Age=QUANTITY, Range=ANY)),
    ),
    "ServiceRequest": (
        Row("ServiceRequest.id", {"id": ID}),
        Row("ServiceRequest.status", {"status": code_in(REQUEST_STATUS, "RequestStatus")}, required=True),
        Row("ServiceRequest.intent", {"intent": code_in(REQUEST_INTENT, "RequestIntent")}, required=True),
        Row("ServiceRequest.priority", {"priority": code_in(REQUEST_PRIORITY, "RequestPriority")}),
        Row("ServiceRequest.code", {"code": CODEABLE_CONCEPT}),
        Row("ServiceRequest.subject", {"subject": REFERENCE}, required=True),
        Row("ServiceRequest.occurrence[x]", _choice("occurrence", DateTime=DATE_TIME, Period=PERIOD, Timing=ANY)),
        Row("ServiceRequest.authoredOn", {"authoredOn": DATE_TIME}),
    ),
    # Draft orders (order-select / order-sign): the elements the order rules read.
    "MedicationRequest": (
        Row("MedicationRequest.id", {"id": ID}),
        Row("MedicationRequest.status", {"status": code_in(MEDICATION_REQUEST_STATUS, "medicationrequest Status")}, required=True),
        Row("MedicationRequest.intent", {"intent": code_in(MEDICATION_REQUEST_INTENT, "medicationRequest Intent")}, required=True),
        Row("MedicationRequest.medication[x]", _choice("medication", CodeableConcept=CODEABLE_CONCEPT, Reference=REFERENCE), required=True),
        Row("MedicationRequest.subject", {"subject": REFERENCE}, required=True),
        Row("MedicationRequest.authoredOn", {"authoredOn": DATE_TIME}),
    ),
    "Medication": (
        Row("Medication.id", {"id": ID}),
        Row("Medication.code", {"code": CODEABLE_CONCEPT}),
    ),
    "Patient": (
        Row("Patient.id", {"id": ID}),
        Row("Patient.gender", {"gender": code_in(ADMINISTRATIVE_GENDER, "AdministrativeGender")}),
        Row("Patient.birthDate", {"birthDate": DATE}),
    ),
}


def _has_code(concept: object, system: str, code: str) -> bool:
    return isinstance(concept, dict) and any(
        isinstance(c, dict) and c.get("system") == system and c.get("code") == code for c in concept.get("coding") or ()
    )


def strict_problem(resource: object, expected_type: str | None = None) -> str | None:
    """None if every element the engine reads from this resource is well-formed FHIR R4, else the first problem."""
    if not isinstance(resource, dict):
        return "not a JSON object"
    kind = resource.get("resourceType")
    if not isinstance(kind, str):
        return "resourceType: missing or not a string"
    if expected_type is not None and kind != expected_type:
        return f"resourceType: {_show(kind)}, expected {expected_type!r}"
    rows = ROWS.get(kind)
    if rows is None:
        return f"resourceType: {_show(kind)} is not a type the engine reads"
    for row in rows:
        problem = row.problem(resource)
        if problem:
            return problem
    return None
