"""What every console command shares: loading a checked rule set, reading --now.

Kept apart from `service.cli` (the entry points) so that commands in other modules can use it
without importing the module that dispatches to them.
"""
from __future__ import annotations

import sys
from datetime import datetime


def load_rules(rules_dir: str):
    """Load a rule set for a command, or print every error to stderr and return None."""
    from service.engine.loader import RuleSetError, load_ruleset
    from service.patient.validation import validation_error

    try:
        return load_ruleset(rules_dir, validate_resource=validation_error)
    except RuleSetError as exc:
        print(f"{len(exc.errors)} error(s) in {rules_dir}:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return None


def parse_when(text: str | None) -> datetime | None:
    """An ISO 8601 date-time (a naive one is local time); ValueError names what was expected."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--now {text!r}: expected an ISO 8601 date-time such as 2026-11-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=datetime.now().astimezone().tzinfo)
