"""Read FHIR Bulk Data NDJSON: which patient each line belongs to, and what could not be placed.

Bulk Data Access IG, "Bulk Data Output File Format": one resource per line, files per type,
a patient's resources spread across files. A line is attributed to a patient by:
- a Patient: its own `id`;
- anything else: its `subject` (else `patient`) reference, written as
  `Patient/<id>`, `Patient/<id>/_history/<n>`, `http(s)://.../Patient/<id>[/_history/<n>]`,
  or `urn:uuid:<x>` (Synthea and Pathling exports), which names the Patient whose id is `<x>`.
  Whether that Patient is in the export is known only once lines are grouped (`place_group`).

Nothing is dropped silently: every line is either attributed, or counted in a `ReadReport`
as unreadable (not UTF-8, not JSON, not a resource), unattributable (with the reason) or skipped
(a type no rule reads).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import msgspec
import orjson

from service.patient.lazy import RawResource

EXAMPLES = 10  # problems kept verbatim per report; the rest are only counted
# FHIR R4 id: [A-Za-z0-9\-\.]{1,64}
_ID = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE = re.compile(rf"^Patient/({_ID})(?:/_history/[^/]+)?$")
_ABSOLUTE = re.compile(rf"^https?://[^\s]+?/Patient/({_ID})(?:/_history/[^/]+)?$")
_UUID = re.compile(r"^urn:uuid:([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})$")
_BARE_ID = re.compile(rf"^{_ID}$")

# How a line was attributed; a `uuid` attribution holds only if the export has that Patient.
BY_ID, BY_REFERENCE, BY_UUID = "id", "reference", "uuid"


class _Ref(msgspec.Struct):
    reference: str | None = None


class _Head(msgspec.Struct):
    resourceType: str | None = None
    id: str | None = None
    subject: _Ref | None = None
    patient: _Ref | None = None


_DECODE = msgspec.json.Decoder(_Head)


@dataclass
class ReadReport:
    """Counts of what a read could not use; partial reports from workers are merged."""

    lines: int = 0
    unreadable: int = 0
    unattributable: Counter = field(default_factory=Counter)  # reason -> resources
    skipped: Counter = field(default_factory=Counter)  # resource type (or "invalid <type>") -> resources
    examples: list[str] = field(default_factory=list)  # "where: problem", the first few
    last: str = ""  # the latest problem, whether or not it is among the examples

    def note(self, where: str, problem: str) -> None:
        self.last = f"{where}: {problem}"
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{where}: {problem}")

    def merge(self, other: ReadReport) -> ReadReport:
        self.lines += other.lines
        self.unreadable += other.unreadable
        self.unattributable.update(other.unattributable)
        self.skipped.update(other.skipped)
        self.examples = (self.examples + other.examples)[:EXAMPLES]
        return self

    @property
    def unattributable_total(self) -> int:
        return sum(self.unattributable.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_json(self) -> dict:
        return {
            "lines": self.lines,
            "unreadable": self.unreadable,
            "unattributable": self.unattributable_total,
            "unattributable_by_reason": dict(self.unattributable.most_common()),
            "skipped": self.skipped_total,
            "skipped_by_type": dict(self.skipped.most_common()),
            "examples": self.examples,
        }

    def lines_of_text(self) -> list[str]:
        """The report in words, for a summary; nothing when every line was used."""
        out = []
        if self.unreadable:
            out.append(f"{self.unreadable} line(s) unreadable (not UTF-8, not JSON or not a resource)")
        if self.unattributable:
            reasons = "; ".join(f"{n} {reason}" for reason, n in self.unattributable.most_common())
            out.append(f"{self.unattributable_total} resource(s) unattributable to a patient: {reasons}")
        if self.skipped:
            kinds = ", ".join(f"{kind} {n}" for kind, n in self.skipped.most_common())
            out.append(f"{self.skipped_total} resource(s) skipped: {kinds}")
        out += [f"  e.g. {example}" for example in self.examples]
        return out


def patient_in_reference(reference: str) -> tuple[str | None, str | None, str | None]:
    """(patient id, how, problem) for a subject/patient reference; exactly one of id and problem is set."""
    for pattern, how in ((_RELATIVE, BY_REFERENCE), (_ABSOLUTE, BY_REFERENCE), (_UUID, BY_UUID)):
        match = pattern.match(reference)
        if match:
            return match.group(1), how, None
    kind = reference.split("/")[0] if "/" in reference and not reference.startswith(("http:", "https:")) else None
    if kind and kind != "Patient":
        return None, None, f"subject is a {kind}, not a Patient"
    return None, None, "subject reference is not a Patient reference"


def attribute(line: bytes | str) -> tuple[str | None, str | None, str | None, str | None]:
    """(resource type, patient id, how, problem) for one NDJSON line.

    `problem` is None when the line is attributed; otherwise the type is None for an
    unreadable line and set for an unattributable one.
    """
    try:
        head = _DECODE.decode(line)
    except msgspec.DecodeError as exc:
        return None, None, None, f"not a JSON resource ({exc})"
    kind = head.resourceType
    if not isinstance(kind, str) or not kind:
        return None, None, None, "no resourceType"
    if kind == "Patient":
        if head.id and _BARE_ID.match(head.id):
            return kind, head.id, BY_ID, None
        return kind, None, None, "a Patient without a valid id"
    reference = (head.subject or head.patient or _Ref()).reference
    if not reference:
        return kind, None, None, "no subject or patient reference"
    patient, how, problem = patient_in_reference(reference)
    return kind, patient, how, problem


def read_lines(lines, where: str, report: ReadReport, keep_types: frozenset[str] | None = None, numbered: bool = True):
    """Yield (patient id, how, line) for each usable line; count the others in `report`.

    `lines` are bytes or str (one resource each, blank lines ignored) and are yielded as given;
    `keep_types`, when given, skips (and counts) resources of other types before they are
    grouped. Problems are noted as `where:line` when `numbered` (a whole file), else as `where`
    (a block of one).
    """
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.lines += 1
        if isinstance(line, bytes) and not line.isascii():
            try:  # NDJSON is UTF-8; msgspec would not look inside the strings it skips
                line.decode()
            except UnicodeDecodeError as exc:
                report.unreadable += 1
                report.note(f"{where}:{number}" if numbered else where, f"not UTF-8 (byte {exc.start})")
                continue
        kind, patient, how, problem = attribute(line)
        if kind is None:
            report.unreadable += 1
            report.note(f"{where}:{number}" if numbered else where, problem)
            continue
        if problem is not None:
            report.unattributable[problem] += 1
            report.note(f"{where}:{number}" if numbered else where, f"{kind}: {problem}")
            continue
        if keep_types is not None and kind not in keep_types:
            report.skipped[kind] += 1
            continue
        yield patient, how, line


def place_group(patient: str, items: list[tuple[str, bytes | str]], report: ReadReport) -> list[bytes | str]:
    """A patient's lines once grouped; `urn:uuid:` lines with no such Patient are unattributable."""
    has_patient = any(how == BY_ID for how, _ in items)
    if has_patient:
        return [line for _, line in items]
    kept = [line for how, line in items if how != BY_UUID]
    dropped = len(items) - len(kept)
    if dropped:
        reason = "urn:uuid reference names no Patient in the export"
        report.unattributable[reason] += dropped
        report.note(f"urn:uuid:{patient}", reason)
    return kept


def resource_of(line: bytes | str) -> dict | RawResource:
    """A grouped line as a patient's record takes it: decoded in one orjson pass.

    A line that is JSON but cannot be held as Python values (a number out of range such as
    1e999, nesting deeper than orjson allows) stays raw: the record then reports that resource
    as invalid if a rule reads it, as it does for a prefetch entry, and the run goes on.
    """
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return RawResource(msgspec.Raw(line))
