"""What the engine reads about a patient: plain entries, filled in by `service.patient`.

Entries carry only what the engine needs to choose among them (status, date, the
matched coding). The reading itself is loaded lazily, because loading validates the
resource with fhir.resources (~200 µs each): only the few entries a rule actually
uses are ever validated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable, Protocol, Sequence


class InvalidResource(Exception):
    """A resource that is not valid FHIR R4; it is skipped and reported, never fatal."""

    def __init__(self, resource_type: str, resource_id: str, error: str) -> None:
        super().__init__(f"{resource_type}/{resource_id}: {error}")
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.error = error


@dataclass(frozen=True)
class Reading:
    """The value part of an Observation, as the lab sent it."""

    value: float | None
    comparator: str | None
    unit: str | None  # the UCUM code when sent, else the free-text unit
    unit_text: str | None  # what to show as "unit as sent"
    data_absent: str | None
    reference_high: float | None
    reference_high_unit: str | None


_UNLOADED = object()


@dataclass(eq=False)
class ObservationEntry:
    resource_id: str
    status: str | None
    effective: datetime | None
    system: str
    code: str
    display: str | None
    source: object = field(repr=False)  # what `load` reads (the raw resource)
    load: Callable[[object, str], Reading] = field(repr=False)  # shared by all entries of a record
    _reading: object = field(default=_UNLOADED, repr=False)

    @property
    def reference(self) -> str:
        return f"Observation/{self.resource_id}"

    def outcome(self) -> "Reading | InvalidResource":
        """The validated reading, or why it is invalid (loaded once, never raised)."""
        if self._reading is _UNLOADED:
            try:
                self._reading = self.load(self.source, self.resource_id)
            except InvalidResource as exc:
                self._reading = exc
        return self._reading  # type: ignore[return-value]

    def reading(self) -> Reading:
        """Return the validated reading; raises InvalidResource."""
        outcome = self.outcome()
        if isinstance(outcome, InvalidResource):
            raise outcome
        return outcome


class _CheckedOnce:
    """Validates its resource on the first `check()` and remembers the answer.

    Subclasses are dataclasses with `resource_id`, `source`, `validate` and `_error` fields.
    """

    def check(self) -> None:
        """Raise InvalidResource if the resource is not valid FHIR R4 (checked once)."""
        if self._error is _UNLOADED:
            try:
                self.validate(self.source, self.resource_id)
                self._error = None
            except InvalidResource as exc:
                self._error = exc
        if self._error is not None:
            raise self._error  # type: ignore[misc]


@dataclass(eq=False)
class ConditionEntry(_CheckedOnce):
    resource_id: str
    clinical_status: str | None
    verification_status: str | None
    system: str
    code: str
    display: str | None
    recorded: datetime | None
    source: object = field(repr=False)
    validate: Callable[[object, str], None] = field(repr=False)
    _error: object = field(default=_UNLOADED, repr=False)

    @property
    def reference(self) -> str:
        return f"Condition/{self.resource_id}"


@dataclass(eq=False)
class OrderEntry:
    """A draft order from the hook context (ServiceRequest or MedicationRequest), read leniently.

    `codings` are what the order is for: ServiceRequest.code, or the medication's code
    (medicationCodeableConcept, or a contained or referenced Medication's code). When
    that code cannot be read, `problem` says why and no value set can match the order.
    """

    resource_type: str
    resource_id: str
    codings: tuple[tuple[str, str, str | None], ...]  # (system, code, display)
    text: str | None  # the order's own display text (code.text, else a coding's display)
    resource: dict = field(repr=False)  # the draft as the EHR sent it, for actions that copy from it
    problem: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"

    @property
    def display(self) -> str:
        return self.text or next((d for _, _, d in self.codings if d), None) or self.reference


@dataclass(eq=False)
class ProcedureEntry(_CheckedOnce):
    resource_id: str
    status: str | None
    performed: datetime | None  # the end of performed[x] when given, else its start
    system: str
    code: str
    display: str | None
    source: object = field(repr=False)
    validate: Callable[[object, str], None] = field(repr=False)
    _error: object = field(default=_UNLOADED, repr=False)

    @property
    def reference(self) -> str:
        return f"Procedure/{self.resource_id}"


@dataclass(frozen=True)
class PatientInfo:
    resource_id: str
    birth_date: date | None
    gender: str | None


class Record(Protocol):
    """A patient's data, indexed by value set once per request."""

    def observations(self, valueset_id: str) -> Sequence[ObservationEntry]:
        """Entries whose code is in the value set, newest first (undated last)."""

    def conditions(self, valueset_id: str) -> Sequence[ConditionEntry]:
        """Condition entries whose code is in the value set."""

    def procedures(self, valueset_id: str) -> Sequence[ProcedureEntry]:
        """Procedure entries whose code is in the value set."""

    def patient(self) -> PatientInfo | None:
        """The Patient resource, if the data holds one."""

    def orders(self, valueset_id: str) -> Sequence[OrderEntry]:
        """Draft orders in scope (order hooks only) whose code is in the value set, in request order."""

    def unreadable_orders(self) -> Sequence[OrderEntry]:
        """Draft orders in scope whose code could not be read (they match no value set)."""
