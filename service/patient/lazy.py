"""Decode a hook request without building Python objects for resources no rule reads.

A 5,000-Observation prefetch parsed whole is ~120,000 dicts and lists: parsing and
freeing them cost more than everything else the service does, and grow faster than
the body (docs/performance.md). Here each Bundle entry stays raw JSON bytes
(`msgspec.Raw`, a view, no copy); the record decodes a small head (type, id, status,
code, dates, subject) to index it, and the whole resource only when a rule reads it.
Malformed JSON anywhere in the body is still rejected: msgspec checks what it skips.
"""
from __future__ import annotations

from typing import Any

import msgspec


class Coding(msgspec.Struct):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class Concept(msgspec.Struct):
    coding: list[Coding] = []
    text: str | None = None


class Reference(msgspec.Struct):
    reference: str | None = None


class Period(msgspec.Struct):
    start: str | None = None
    end: str | None = None


class Head(msgspec.Struct):
    """What indexing a resource needs; every other field is skipped, not built."""

    resourceType: str | None = None
    id: str | None = None
    status: str | None = None
    code: Concept | None = None
    subject: Reference | None = None
    effectiveDateTime: str | None = None
    effectivePeriod: Period | None = None
    effectiveInstant: str | None = None
    issued: str | None = None
    clinicalStatus: Concept | None = None
    verificationStatus: Concept | None = None
    recordedDate: str | None = None
    onsetDateTime: str | None = None
    performedDateTime: str | None = None
    performedPeriod: Period | None = None


class _Entry(msgspec.Struct):
    resource: msgspec.Raw = msgspec.Raw(b"null")
    fullUrl: Any = None  # kept: a Bundle's references may name its Patient entry by it (urn:uuid:...)


_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENTRIES = msgspec.json.Decoder(list[_Entry])
_HEAD = msgspec.json.Decoder(Head)
_ANY = msgspec.json.Decoder()


class UnreadableJson(ValueError):
    """JSON that is well-formed but cannot be held as Python values (a number out of range, nesting too deep)."""


class RawResource:
    """One resource as the JSON bytes it arrived in; decoded on demand, once."""

    __slots__ = ("raw", "_decoded")

    def __init__(self, raw: msgspec.Raw) -> None:
        self.raw = raw
        self._decoded: Any = None

    def head(self) -> Head:
        """Decode only the fields used for indexing; raises msgspec.MsgspecError if they are malformed."""
        return _HEAD.decode(self.raw)

    def decode(self) -> Any:
        """The whole resource as Python objects; UnreadableJson if a number is out of range (1e999)."""
        if self._decoded is None:
            try:
                self._decoded = _ANY.decode(self.raw)
            except (msgspec.ValidationError, RecursionError) as exc:
                raise UnreadableJson(f"unreadable JSON: {type(exc).__name__}: {str(exc).split(' - at ')[0]}") from None
        return self._decoded


def decode_hook_body(data: bytes) -> Any:
    """Decode a hook request, keeping prefetch Bundle entries raw.

    Raises msgspec.DecodeError if malformed, msgspec.ValidationError for a number out of range
    outside a Bundle entry, and RecursionError for nesting deeper than the decoder allows; a
    Bundle entry holding such a number decodes to UnreadableJson only when it is read.
    """
    try:
        top = _OBJECT.decode(data)
    except msgspec.ValidationError:  # valid JSON, but not an object: let request checks say so
        return _ANY.decode(data)
    body = {key: _ANY.decode(raw) for key, raw in top.items() if key != "prefetch"}
    if "prefetch" in top:
        body["prefetch"] = _prefetch(top["prefetch"])
    return body


def _prefetch(raw: msgspec.Raw) -> Any:
    try:
        values = _OBJECT.decode(raw)
    except msgspec.ValidationError:
        return _ANY.decode(raw)
    return {key: _value(value) for key, value in values.items()}


def _value(raw: msgspec.Raw) -> Any:
    """A prefetch value: a Bundle with raw entries, or anything else decoded whole (a Patient, null...)."""
    try:
        fields = _OBJECT.decode(raw)
    except msgspec.ValidationError:
        return _ANY.decode(raw)
    if "entry" not in fields or fields.get("resourceType") != msgspec.Raw(b'"Bundle"'):
        return _ANY.decode(raw)
    try:
        entries = _ENTRIES.decode(fields["entry"])
    except msgspec.ValidationError:  # an odd entry list: decode it all and let the usual checks speak
        return _ANY.decode(raw)
    bundle = {key: _ANY.decode(value) for key, value in fields.items() if key != "entry"}
    bundle["entry"] = [{"resource": RawResource(e.resource), "fullUrl": e.fullUrl} for e in entries]
    return bundle
