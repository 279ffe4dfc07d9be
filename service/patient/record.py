"""A patient's resources indexed by value set once per request.

Building the record walks the raw JSON once and keeps only resources whose code is
in a value set some rule reads; nothing is checked until a rule asks for its value
(see `service.engine.record`). Then the elements the engine reads are checked strictly
(`service.patient.strict`); with `full_validation` (CDS_VALIDATION=full) the whole
resource is also validated with fhir.resources. Invalid resources are counted and
logged by type and id, never fatal.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Iterable

from service.engine.record import ConditionEntry, InvalidResource, ObservationEntry, OrderEntry, PatientInfo, ProcedureEntry, Reading
from service.engine.valuesets import CodeIndex

import msgspec

from .dates import parse_date, parse_datetime
from .lazy import HEAD_DECODER, Coding, Concept, Head, RawResource, UnreadableJson
from .strict import strict_problem
from .validation import validation_error

log = logging.getLogger(__name__)

UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
INDEXED_TYPES = ("Observation", "Condition", "Procedure", "Patient")
MAX_DESCRIBED_UNREADABLE = 20  # unreadable resources validated and logged one by one; the rest are counted


class _ValuePart(msgspec.Struct, gc=False):
    dataAbsentReason: Any = None
    valueQuantity: Any = None


_VALUE_PART = msgspec.json.Decoder(_ValuePart)


class PatientRecord:
    def __init__(
        self, code_index: CodeIndex, patient_id: str | None = None, *, log_context: dict | None = None,
        aliases: Iterable[str] = (), base_url: str | None = None, attributed: bool = False,
        full_validation: bool = False,
    ) -> None:
        self.code_index = code_index
        self.full_validation = full_validation
        self.patient_id = patient_id
        # The caller already attributed every resource to this patient (a Bulk export reader
        # grouping by reference): subject references are not checked again.
        self.attributed = attributed
        # Other references that mean this patient: a Bundle entry's fullUrl (urn:uuid:...) or an absolute URL.
        self.aliases = frozenset(aliases)
        # Servers the patient is known on: the fhirServer, and the base of an absolute alias
        # (".../fhir/Patient/7" makes ".../fhir/Patient/7/_history/2" this patient too).
        suffix = f"/Patient/{patient_id}"
        bases = [base_url.rstrip("/")] if base_url else []
        bases += [a[: -len(suffix)] for a in sorted(self.aliases) if patient_id and a.endswith(suffix) and "://" in a]
        self.bases = tuple(dict.fromkeys(bases))
        self.unattributed = 0  # resources whose subject reference names no patient we can tell
        self._reference_verdicts: dict[str, str] = {}  # subject reference -> "patient" | "other" | "unattributed"
        self.invalid: dict[str, str] = {}  # "Type/id" -> first validation problem
        self.other_patient = 0
        self.unreadable = 0  # resources whose indexed fields have the wrong JSON types (all counted)
        self._log_context = log_context or {}
        self._observations: dict[str, list[ObservationEntry]] = defaultdict(list)
        self._conditions: dict[str, list[ConditionEntry]] = defaultdict(list)
        self._procedures: dict[str, list[ProcedureEntry]] = defaultdict(list)
        self._patient: PatientInfo | None = None
        self._patient_checked = False
        self._patient_raw: dict | None = None
        self._orders: dict[str, list[OrderEntry]] = defaultdict(list)
        self._unreadable_orders: list[OrderEntry] = []
        self._seen: set[tuple[str, str]] = set()
        self._sorted: set[str] = set()
        self._anonymous = 0
        self._match_cache: dict[tuple, frozenset[str]] = {}
        # One bound method each, shared by every entry (no closure per resource).
        self._load_reading = self._reading
        self._validate_condition = lambda resource, rid: self._validate(resource, "Condition", rid)
        self._validate_procedure = lambda resource, rid: self._validate(resource, "Procedure", rid)
        self._adders = {"Observation": self._add_observation, "Condition": self._add_condition,
                        "Procedure": self._add_procedure, "Patient": None}

    # --- building ----------------------------------------------------------------------------

    def add_all(self, resources: Iterable[object]) -> None:
        """Add resources (not bundles) from prefetch or the FHIR server: dicts or raw JSON."""
        for resource in resources:
            if isinstance(resource, (dict, RawResource)):
                self.add(resource)

    def add(self, resource: dict | RawResource) -> None:
        """Index one resource if a rule can use it; skip other types."""
        try:
            head = HEAD_DECODER.decode(resource.raw) if type(resource) is RawResource else msgspec.convert(resource, Head)
        except msgspec.MsgspecError as exc:
            self._unreadable(resource, str(exc))
            return
        kind = head.resourceType
        if kind not in self._adders:
            return
        add = self._adders[kind]
        rid = head.id
        if not rid:
            self._anonymous += 1
            rid = f"(no id #{self._anonymous})"
        key = (kind, rid)
        if key in self._seen:  # the same resource from two keys or pages
            return
        self._seen.add(key)
        if add is None:  # the Patient
            self._add_patient(resource, rid)
        elif self._belongs_to_patient(head.subject.reference if head.subject else None):
            add(head, resource, rid)

    def _unreadable(self, resource: dict | RawResource, problem: str) -> None:
        """A resource whose code, dates or statuses have the wrong JSON types: invalid, reported.

        Each one is counted; only the first few are validated to say what is wrong and logged
        (validation costs ~200 µs: 50,000 of them took 8 s), so a hostile chart stays bounded.
        A Condition or Procedure whose code still matches a value set is indexed as unreadable,
        so the fact it would decide becomes unknown instead of absent.
        """
        try:
            full = resource.decode() if isinstance(resource, RawResource) else resource
        except UnreadableJson as exc:
            self.unreadable += 1
            if self.unreadable <= MAX_DESCRIBED_UNREADABLE:
                self._invalid("Resource", "(unreadable)", str(exc))
            return
        kind = full.get("resourceType") if isinstance(full, dict) else None
        if kind not in INDEXED_TYPES:
            return
        self.unreadable += 1
        rid = full.get("id") if isinstance(full.get("id"), str) else "(no id)"
        if self.unreadable <= MAX_DESCRIBED_UNREADABLE:
            error = self._invalid(kind, rid, self.problem(full, kind) or f"unreadable structure ({problem})")
        else:
            error = InvalidResource(kind, rid, f"unreadable structure ({problem})")
            if self.unreadable == MAX_DESCRIBED_UNREADABLE + 1:
                log.warning(
                    "more unreadable resources: counted, not described",
                    extra={"event": "invalid_resource_sample_full", "described": MAX_DESCRIBED_UNREADABLE, **self._log_context},
                )
        if kind in ("Condition", "Procedure"):
            self._index_unreadable(kind, full, rid, error)

    def _index_unreadable(self, kind: str, full: dict, rid: str, error: InvalidResource) -> None:
        subject = full.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        code = full.get("code")
        codings = code.get("coding") if isinstance(code, dict) else None
        if not isinstance(codings, list) or not self._belongs_to_patient(reference if isinstance(reference, str) else None):
            return
        for coding in codings:
            if not isinstance(coding, dict) or not isinstance(coding.get("system"), str) or not isinstance(coding.get("code"), str):
                continue
            ids = self.code_index.match(coding["system"], coding["code"])
            if not ids:
                continue

            def fail(source: object, resource_id: str, error: InvalidResource = error) -> None:
                raise error

            display = coding.get("display") if isinstance(coding.get("display"), str) else None
            if kind == "Condition":
                entry: ConditionEntry | ProcedureEntry = ConditionEntry(rid, None, None, coding["system"], coding["code"], display, None, source=full, validate=fail)
                index: dict = self._conditions
            else:
                entry = ProcedureEntry(rid, None, None, coding["system"], coding["code"], display, source=full, validate=fail)
                index = self._procedures
            for vs_id in ids:
                index[vs_id].append(entry)
            return

    def _belongs_to_patient(self, reference: str | None) -> bool:
        """Say whether a subject reference means this patient; count those about others or no one we can tell."""
        if self.attributed or not self.patient_id or not reference:
            return True  # prefetch and server searches are for this patient; a Bulk group was attributed
        # A chart names its patient the same way thousands of times: decide each spelling once.
        verdict = self._reference_verdicts.get(reference)
        if verdict is None:
            named = {referenced_patient(reference, base) for base in self.bases or (None,)}
            verdict = "patient" if reference in self.aliases or self.patient_id in named else (
                "other" if named - {None} else "unattributed"
            )
            self._reference_verdicts[reference] = verdict
        if verdict == "patient":
            return True
        if verdict == "other":
            self.other_patient += 1
        else:
            self.unattributed += 1
        return False

    def _matches(self, head: Head) -> list[tuple[Coding, frozenset[str]]]:
        found = []
        for coding in head.code.coding if head.code else ():
            key = (coding.system, coding.code)
            ids = self._match_cache.get(key)
            if ids is None:  # a chart repeats a few dozen codes thousands of times
                ids = self._match_cache[key] = self.code_index.match(*key)
            if ids:
                found.append((coding, ids))
        return found

    def _add_observation(self, head: Head, source: dict | RawResource, rid: str) -> None:
        matches = self._matches(head)
        if not matches:
            return
        coding = matches[0][0]
        effective = parse_datetime(
            head.effectiveDateTime
            or (head.effectivePeriod.start if head.effectivePeriod else None)
            or head.effectiveInstant
            or head.issued
        )
        entry = ObservationEntry(
            rid, head.status, effective, coding.system, coding.code, coding.display,
            source=source, load=self._load_reading,
        )
        ids = matches[0][1] if len(matches) == 1 else frozenset().union(*(ids for _, ids in matches))
        for vs_id in ids:
            self._observations[vs_id].append(entry)
        if self._sorted:  # added after a rule read the list: sort it again on the next read
            self._sorted.difference_update(ids)

    def _add_condition(self, head: Head, source: dict | RawResource, rid: str) -> None:
        matches = self._matches(head)
        if not matches:
            return
        coding = matches[0][0]
        entry = ConditionEntry(
            rid,
            _status(head.clinicalStatus, CLINICAL),
            _status(head.verificationStatus, VERIFICATION),
            coding.system, coding.code, coding.display or (head.code.text if head.code else None),
            parse_datetime(head.recordedDate or head.onsetDateTime),
            source=source, validate=self._validate_condition,
        )
        for vs_id in frozenset().union(*(ids for _, ids in matches)):
            self._conditions[vs_id].append(entry)

    def _add_procedure(self, head: Head, source: dict | RawResource, rid: str) -> None:
        matches = self._matches(head)
        if not matches:
            return
        coding = matches[0][0]
        period = head.performedPeriod
        performed = parse_datetime(head.performedDateTime or (period.end or period.start if period else None))
        entry = ProcedureEntry(
            rid, head.status, performed, coding.system, coding.code, coding.display or (head.code.text if head.code else None),
            source=source, validate=self._validate_procedure,
        )
        for vs_id in frozenset().union(*(ids for _, ids in matches)):
            self._procedures[vs_id].append(entry)

    def _add_patient(self, resource: dict | RawResource, rid: str) -> None:
        if self.patient_id and rid != self.patient_id:
            self.other_patient += 1
            return
        try:
            self._patient_raw = resource.decode() if isinstance(resource, RawResource) else resource
        except UnreadableJson as exc:
            self._invalid("Patient", rid, str(exc))

    def add_orders(self, orders: Iterable[OrderEntry]) -> None:
        """Index the draft orders in scope (from an order hook's context) by value set."""
        for order in orders:
            if order.problem:
                self._unreadable_orders.append(order)
                continue
            ids = frozenset().union(*(self.code_index.match(system, code) for system, code, _ in order.codings))
            for vs_id in ids:
                self._orders[vs_id].append(order)

    # --- validation, lazily -------------------------------------------------------------------

    def _invalid(self, kind: str, rid: str, problem: str) -> InvalidResource:
        key = f"{kind}/{rid}"
        if key not in self.invalid:
            self.invalid[key] = problem
            if len(self.invalid) > MAX_DESCRIBED_UNREADABLE:
                return InvalidResource(kind, rid, problem)  # counted and shown in explanations, not logged
            # A Patient's id is patient data: its type alone goes to the log.
            shown = key if kind != "Patient" else "Patient"
            log.warning("invalid FHIR resource skipped", extra={"event": "invalid_resource", "resource": shown, "problem": problem, **self._log_context})
        return InvalidResource(kind, rid, problem)

    def problem(self, resource: object, kind: str) -> str | None:
        """What makes a resource unreadable: the strict checks, then (CDS_VALIDATION=full) fhir.resources."""
        problem = strict_problem(resource, kind)
        if problem is None and self.full_validation:
            problem = validation_error(resource)  # type: ignore[arg-type]
        return problem

    def _validate(self, source: dict | RawResource, kind: str, rid: str) -> dict:
        try:
            resource = source.decode() if isinstance(source, RawResource) else source
        except UnreadableJson as exc:
            raise self._invalid(kind, rid, str(exc)) from None
        problem = self.problem(resource, kind)
        if problem:
            raise self._invalid(kind, rid, problem)
        return resource

    def _reading(self, source: dict | RawResource, rid: str) -> Reading:
        if isinstance(source, RawResource):
            try:  # only the value's fields, not the whole resource: most unusable ones stop here
                value = _VALUE_PART.decode(source.raw)
                absent, quantity = value.dataAbsentReason, value.valueQuantity
            except msgspec.MsgspecError:  # e.g. 1e999: reported as invalid by the full decode
                resource = self._validate(source, "Observation", rid)
                absent, quantity = resource.get("dataAbsentReason"), resource.get("valueQuantity")
        else:
            absent, quantity = source.get("dataAbsentReason"), source.get("valueQuantity")
        if not absent and isinstance(quantity, dict) and quantity.get("value") is not None and _number(quantity["value"]) is None:
            raise self._invalid("Observation", rid, "valueQuantity.value: not a finite decimal number")
        if absent or not isinstance(quantity, dict) or quantity.get("value") is None:
            # Unusable whatever else it holds: say why without validating a resource no rule will
            # use (validation costs ~200 µs; a chart of thousands of these must stay cheap).
            return Reading(None, None, None, None, _coded_text(absent) if absent else None, None, None)
        resource = self._validate(source, "Observation", rid)
        code, text = quantity.get("code"), quantity.get("unit")
        # Trust `code` as a unit only when it is UCUM (or unlabelled); a local code system's codes are not units.
        unit = code if code and quantity.get("system") in (None, UCUM) else text
        high = next((r["high"] for r in resource.get("referenceRange") or () if isinstance(r, dict) and r.get("high")), None) or {}
        high_unit = high.get("code") if high.get("code") and high.get("system") in (None, UCUM) else high.get("unit")
        try:
            value, reference_high = _number(quantity.get("value")), _number(high.get("value"))
        except OverflowError:  # a 400-digit integer is valid JSON and a valid FHIR decimal, but no lab value
            raise self._invalid("Observation", rid, "a value is too large to be a number") from None
        return Reading(
            value=value,
            comparator=quantity.get("comparator"),
            unit=unit,
            unit_text=text or code,
            data_absent=_coded_text(absent) if absent else None,
            reference_high=reference_high,
            reference_high_unit=high_unit,
        )

    # --- the engine's view (service.engine.record.Record) ---------------------------------------

    def observations(self, valueset_id: str) -> list[ObservationEntry]:
        entries = self._observations.get(valueset_id, [])
        if valueset_id not in self._sorted:
            entries.sort(key=_newest_first, reverse=True)
            self._sorted.add(valueset_id)
        return entries

    def conditions(self, valueset_id: str) -> list[ConditionEntry]:
        return self._conditions.get(valueset_id, [])

    def procedures(self, valueset_id: str) -> list[ProcedureEntry]:
        return self._procedures.get(valueset_id, [])

    def patient(self) -> PatientInfo | None:
        if not self._patient_checked:
            self._patient_checked = True
            raw = self._patient_raw
            if raw is not None:
                problem = self.problem(raw, "Patient")
                if problem:
                    self._invalid("Patient", raw.get("id") if isinstance(raw.get("id"), str) else "(no id)", problem)
                else:
                    self._patient = PatientInfo(raw.get("id", ""), parse_date(raw.get("birthDate")), raw.get("gender"))
        return self._patient

    def orders(self, valueset_id: str) -> list[OrderEntry]:
        return self._orders.get(valueset_id, [])

    def unreadable_orders(self) -> list[OrderEntry]:
        return self._unreadable_orders

    @property
    def skipped(self) -> int:
        """Resources skipped as invalid: those described in `invalid` and those only counted."""
        return len(self.invalid) + max(0, self.unreadable - MAX_DESCRIBED_UNREADABLE)

    @property
    def counts(self) -> dict[str, int]:
        """How many indexed resources of each kind (for logs and replay output)."""
        return {
            "observations": len({id(e) for entries in self._observations.values() for e in entries}),
            "conditions": len({id(e) for entries in self._conditions.values() for e in entries}),
            "procedures": len({id(e) for entries in self._procedures.values() for e in entries}),
        }


_UNDATED = datetime.min.replace(tzinfo=UTC)


def _newest_first(entry: ObservationEntry) -> datetime:
    """Sort key (reversed): newest first, undated last; no tuple per entry on a 5,000-result chart."""
    return entry.effective or _UNDATED


def _number(value: object) -> float | None:
    """A JSON number, or None for null, text or booleans (which pass FHIR validation as decimals)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # a 400-digit integer: not a lab value
        return None
    return number if math.isfinite(number) else None


def _status(concept: Concept | None, system: str) -> str | None:
    if concept is None:
        return None
    preferred = [c for c in concept.coding if c.system == system] or concept.coding
    return preferred[0].code if preferred else None


def _coded_text(concept: object) -> str:
    if isinstance(concept, dict):
        coding = (concept.get("coding") or [{}])[0]
        return coding.get("code") or concept.get("text") or "unknown"
    return "unknown"


def referenced_patient(reference: str, base_url: str | None = None) -> str | None:
    """The patient id a reference names: `Patient/<id>`, `Patient/<id>/_history/<n>`, or either
    absolute on `base_url` (the FHIR server the data came from); None for any other form."""
    if base_url and reference.startswith(base_url.rstrip("/") + "/"):
        reference = reference[len(base_url.rstrip("/")) + 1:]
    parts = reference.split("/")
    if parts[0] != "Patient" or len(parts) not in (2, 4) or not parts[1]:
        return None
    if len(parts) == 4 and (parts[2] != "_history" or not parts[3]):
        return None
    return parts[1]


def patient_aliases(values: Iterable[object], patient_id: str | None) -> set[str]:
    """The fullUrls that Bundles among `values` give this patient's Patient entry (e.g. urn:uuid:...)."""
    found: set[str] = set()
    if not patient_id:
        return found
    for value in values:
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle" or not isinstance(value.get("entry"), list):
            continue
        for entry in value["entry"]:
            url = entry.get("fullUrl") if isinstance(entry, dict) else None
            if not isinstance(url, str) or not (url.startswith("urn:") or "/Patient/" in url):
                continue  # only a Patient entry can name the patient; most entries stop here
            resource = entry.get("resource")
            try:
                head = resource.head() if isinstance(resource, RawResource) else msgspec.convert(resource, Head)
            except msgspec.MsgspecError:
                continue
            if head.resourceType == "Patient" and head.id == patient_id:
                found.add(url)
    return found


def resources_in(value: object) -> list[dict | RawResource]:
    """The resources in a prefetch value: a Bundle's entries (dicts or raw JSON), or the resource itself.

    Search bundles may also carry OperationOutcomes as entries (search.mode "outcome"):
    the record ignores every type it does not index.
    """
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        if not isinstance(entries, list):
            return []
        return [
            entry["resource"] for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("resource"), (dict, RawResource))
        ]
    return [value]
