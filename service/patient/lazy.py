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


# Structs decoded from JSON are trees (no cycles), so they are kept out of the garbage
# collector (gc=False): a 5,000-resource chart then triggers far fewer collections.


class Coding(msgspec.Struct, gc=False):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class Concept(msgspec.Struct, gc=False):
    coding: list[Coding] = []
    text: str | None = None


class Reference(msgspec.Struct, gc=False):
    reference: str | None = None


class Period(msgspec.Struct, gc=False):
    start: str | None = None
    end: str | None = None


class Head(msgspec.Struct, gc=False):
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


class _Entry(msgspec.Struct, gc=False):
    resource: msgspec.Raw = msgspec.Raw(b"null")
    fullUrl: Any = None  # kept: a Bundle's references may name its Patient entry by it (urn:uuid:...)


class _Bundle(msgspec.Struct, gc=False):
    """A prefetch Bundle in one pass: what the service reads of it (its other fields are dropped)."""

    resourceType: Any = None
    entry: list[_Entry] | None = None
    link: Any = None  # the next page, when the EHR paginated its prefetch
    type: Any = None
    total: Any = None


_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_BUNDLE = msgspec.json.Decoder(_Bundle)
HEAD_DECODER = msgspec.json.Decoder(Head)
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
        return HEAD_DECODER.decode(self.raw)

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
        shape = _BUNDLE.decode(raw)
    except msgspec.ValidationError:  # not an object, or an odd entry list: decode it all and let the usual checks speak
        return _ANY.decode(raw)
    if shape.resourceType != "Bundle" or shape.entry is None:
        return _ANY.decode(raw)
    bundle = {"resourceType": "Bundle"}
    for name in ("type", "total", "link"):
        value = getattr(shape, name)
        if value is not None:
            bundle[name] = value
    bundle["entry"] = [{"resource": RawResource(e.resource), "fullUrl": e.fullUrl} for e in shape.entry]
    return bundle
