"""ISO 8601 durations as rule authors write them (`P90D`, `P2W`, `PT12H`)."""
from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^P(?:(?P<weeks>\d+)W|(?P<days>\d+)D(?:T(?P<hours>\d+)H)?|T(?P<only_hours>\d+)H)$")


class DurationError(ValueError):
    """A duration a rule author wrote that the engine cannot read."""


def parse_duration(text: object) -> timedelta:
    """Parse `P<n>D`, `P<n>W`, `PT<n>H` or `P<n>DT<n>H` into a timedelta."""
    if not isinstance(text, str):
        raise DurationError(f"expected an ISO 8601 duration such as P90D, got {text!r}")
    match = _DURATION.match(text.strip())
    if not match:
        # Months and years vary in length; a look-back window must mean one number of days.
        hint = " (months and years vary in length: write days, e.g. P180D)" if re.search(r"\d+[MY]", text) else ""
        raise DurationError(f"expected an ISO 8601 duration such as P90D, P2W or PT12H, got {text!r}{hint}")
    parts = {k: int(v) for k, v in match.groupdict().items() if v}
    return timedelta(
        weeks=parts.get("weeks", 0),
        days=parts.get("days", 0),
        hours=parts.get("hours", 0) + parts.get("only_hours", 0),
    )


def format_duration(delta: timedelta) -> str:
    """Say a window the way a clinician reads it: '90 days', '12 hours'."""
    if delta.days and not delta.seconds:
        return f"{delta.days} day{'s' if delta.days != 1 else ''}"
    hours = int(delta.total_seconds() // 3600)
    return f"{hours} hour{'s' if hours != 1 else ''}"
