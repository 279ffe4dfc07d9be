"""Validation of a CDS Hooks 2.0 feedback request body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

__all__ = ["FeedbackError", "FeedbackItem", "parse_feedback", "MAX_ITEMS", "OUTCOMES"]

Outcome = Literal["accepted", "overridden"]
OUTCOMES: tuple[str, ...] = ("accepted", "overridden")
# One post is one clinician's session: a few cards. A cap keeps each store transaction short.
MAX_ITEMS = 100

# RFC 3339 section 5.6 date-time.  Parsed by hand because datetime.fromisoformat
# accepts many non-RFC forms (no seconds, week dates, space separator, no offset).
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)

_TIMESTAMP_EXPECTED = "expected an RFC 3339 date-time in UTC"

# Distinguishes an absent member from an explicit JSON null in error messages.
_MISSING: Any = object()


class FeedbackError(ValueError):
    """A feedback request body that does not follow CDS Hooks 2.0."""

    def __init__(self, message: str, index: int | None = None, field: str | None = None, code: str = "invalid_feedback"):
        self.message = message
        self.code = code
        self.index = index
        self.field = field
        super().__init__(f"{self.location}: {message}")

    @property
    def location(self) -> str:
        """Path of the offending value, e.g. feedback[2].outcomeTimestamp."""
        if self.index is None:
            return self.field or "body"
        path = f"feedback[{self.index}]"
        return f"{path}.{self.field}" if self.field else path


@dataclass(frozen=True)
class FeedbackItem:
    """One validated feedback entry."""

    card: str
    outcome: Outcome
    accepted_suggestions: tuple[str, ...]
    override_reason_code: str | None
    override_reason_system: str | None
    override_reason_display: str | None
    user_comment: str | None
    outcome_timestamp: datetime


def _describe(value: object) -> str:
    """Short, bounded rendering of a bad value for an error message."""
    if value is _MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, str):
        # Bounded so a hostile body cannot make us echo megabytes back.
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _parse_timestamp(value: object, index: int) -> datetime:
    """Parse an RFC 3339 date-time into an aware UTC datetime."""
    match = _RFC3339.match(value) if isinstance(value, str) else None
    if match is None:
        raise FeedbackError(f"{_TIMESTAMP_EXPECTED}, got {_describe(value)}", index, "outcomeTimestamp")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    # Sub-microsecond digits are beyond datetime's precision; truncating is harmless.
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        offset = timedelta(0)
        if not zulu:
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            if sign == "-":
                offset = -offset
        parsed = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro,
            tzinfo=timezone(offset),
        )
        # The spec asks for UTC; an explicit offset is unambiguous, so normalise instead of rejecting.
        return parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        # Well-formed but impossible (2021-02-30, 25:00) or outside datetime's range once in UTC.
        raise FeedbackError(
            f"{_TIMESTAMP_EXPECTED}, got {_describe(value)}", index, "outcomeTimestamp"
        ) from None


def _optional_string(container: dict[str, Any], key: str, index: int, path: str) -> str | None:
    """Return an optional string member; JSON null counts as absent."""
    value = container.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FeedbackError(f"expected a string, got {_describe(value)}", index, path)
    return value


def _parse_suggestions(item: dict[str, Any], index: int, required: bool) -> tuple[str, ...]:
    """Validate acceptedSuggestions and return the suggestion ids."""
    value = item.get("acceptedSuggestions")
    if value is None:
        if required:
            raise FeedbackError(
                "required when outcome is 'accepted' (an array of {\"id\": ...})",
                index, "acceptedSuggestions",
            )
        return ()
    if not isinstance(value, list):
        raise FeedbackError(f"expected an array, got {_describe(value)}", index, "acceptedSuggestions")
    if required and not value:
        raise FeedbackError(
            "must name at least one suggestion when outcome is 'accepted'", index, "acceptedSuggestions"
        )
    ids = []
    for position, suggestion in enumerate(value):
        if not isinstance(suggestion, dict):
            raise FeedbackError(
                f"expected an object, got {_describe(suggestion)}", index, f"acceptedSuggestions[{position}]"
            )
        suggestion_id = suggestion.get("id", _MISSING)
        if not isinstance(suggestion_id, str) or not suggestion_id:
            raise FeedbackError(
                f"expected a non-empty string, got {_describe(suggestion_id)}",
                index, f"acceptedSuggestions[{position}].id",
            )
        ids.append(suggestion_id)
    return tuple(ids)


def _parse_override_reason(
    item: dict[str, Any], index: int
) -> tuple[str | None, str | None, str | None, str | None]:
    """Validate overrideReason; return (code, system, display, userComment)."""
    reason = item.get("overrideReason")
    if reason is None:
        return None, None, None, None
    if not isinstance(reason, dict):
        raise FeedbackError(f"expected an object, got {_describe(reason)}", index, "overrideReason")
    comment = _optional_string(reason, "userComment", index, "overrideReason.userComment")
    coding = reason.get("reason")
    if coding is None:
        # The spec allows a bare userComment when no coded reason was picked.
        return None, None, None, comment
    if not isinstance(coding, dict):
        raise FeedbackError(f"expected a Coding object, got {_describe(coding)}", index, "overrideReason.reason")
    code = coding.get("code", _MISSING)
    if not isinstance(code, str) or not code:
        raise FeedbackError(
            f"expected a non-empty string, got {_describe(code)}", index, "overrideReason.reason.code"
        )
    system = _optional_string(coding, "system", index, "overrideReason.reason.system")
    display = _optional_string(coding, "display", index, "overrideReason.reason.display")
    return code, system, display, comment


def _parse_item(item: object, index: int) -> FeedbackItem:
    """Validate one element of the feedback array."""
    if not isinstance(item, dict):
        raise FeedbackError(f"expected an object, got {_describe(item)}", index)
    card = item.get("card", _MISSING)
    if not isinstance(card, str) or not card:
        raise FeedbackError(f"expected the card uuid as a non-empty string, got {_describe(card)}", index, "card")
    outcome = item.get("outcome", _MISSING)
    if outcome not in OUTCOMES:
        raise FeedbackError(
            f"expected 'accepted' or 'overridden', got {_describe(outcome)}", index, "outcome"
        )
    suggestions = _parse_suggestions(item, index, required=outcome == "accepted")
    code, system, display, comment = _parse_override_reason(item, index)
    timestamp = _parse_timestamp(item.get("outcomeTimestamp", _MISSING), index)
    return FeedbackItem(
        card=card,
        outcome=outcome,
        accepted_suggestions=suggestions,
        override_reason_code=code,
        override_reason_system=system,
        override_reason_display=display,
        user_comment=comment,
        outcome_timestamp=timestamp,
    )


def parse_feedback(body: object, max_items: int = MAX_ITEMS) -> list[FeedbackItem]:
    """Validate a decoded feedback request body and return its items (at most `max_items`)."""
    if not isinstance(body, dict):
        raise FeedbackError(f"expected a JSON object with a 'feedback' array, got {_describe(body)}")
    items = body.get("feedback", _MISSING)
    if not isinstance(items, list):
        raise FeedbackError(f"expected an array, got {_describe(items)}", field="feedback")
    if not items:
        raise FeedbackError("expected at least one feedback item, got an empty array", field="feedback")
    if len(items) > max_items:
        raise FeedbackError(
            f"at most {max_items} items per post, got {len(items)}; send the rest in further posts",
            field="feedback", code="too_many_items",
        )
    return [_parse_item(item, index) for index, item in enumerate(items)]
