"""FHIR date and dateTime values as aware datetimes (partial dates start their period)."""
from __future__ import annotations

from datetime import UTC, date, datetime


def parse_datetime(value: object) -> datetime | None:
    """Parse a FHIR dateTime/instant/date; None if absent or unreadable."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    if len(value) > 10:  # the common case, a full dateTime: one call (Python 3.11 reads "Z" itself)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    text = value.strip()
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    # FHIR requires a zone whenever a time is given; a date alone is read as UTC midnight.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_date(value: object) -> date | None:
    """Parse a FHIR date (Patient.birthDate), partial dates included."""
    parsed = parse_datetime(value)
    return parsed.date() if parsed else None
