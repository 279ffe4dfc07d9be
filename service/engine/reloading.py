"""Serve one rule set, swap in a new one only when it loads cleanly.

The current RuleSet is replaced by assigning one reference, so a request that took
`store.current` keeps a whole rule set for its lifetime. A rule set that fails
validation is refused: the last good one keeps serving and the failure is kept for
the status endpoint.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable

from .loader import ResourceValidator, RuleSetError, file_signature, load_ruleset
from .model import RuleSet

log = logging.getLogger(__name__)


class RuleStore:
    def __init__(self, directory: str | Path, *, validate_resource: ResourceValidator | None = None) -> None:
        self.directory = Path(directory)
        self._validate = validate_resource
        self._lock = threading.Lock()
        self._signature = file_signature(self.directory) if self.directory.is_dir() else ()
        self._current = load_ruleset(self.directory, validate_resource=validate_resource)  # at start: fail loudly
        self.last_error: list[str] | None = None
        self.last_attempt: datetime | None = None
        self.listeners: list[Callable[[bool], None]] = []
        self._watcher_pid: int | None = None

    @property
    def current(self) -> RuleSet:
        return self._current

    def refresh(self, *, force: bool = False) -> bool | None:
        """Reload if the files changed (or when forced); True = swapped, False = refused, None = unchanged."""
        with self._lock:
            signature = file_signature(self.directory) if self.directory.is_dir() else ()
            if signature == self._signature and not force:
                return None
            # Remember the signature even on failure, so a broken set is not re-read every poll.
            self._signature = signature
            self.last_attempt = datetime.now(UTC)
            try:
                ruleset = load_ruleset(self.directory, validate_resource=self._validate)
            except Exception as exc:  # a loader surprise must not take the serving set down either
                self.last_error = [str(e) for e in exc.errors] if isinstance(exc, RuleSetError) else [f"{type(exc).__name__}: {exc}"]
                log.error(
                    "rule reload refused; still serving the last good rule set",
                    extra={"event": "rules_reload_failed", "errors": self.last_error, "serving": self._current.fingerprint},
                )
                ok = False
            else:
                self._current, self.last_error = ruleset, None
                log.info("rules reloaded", extra={"event": "rules_reloaded", "fingerprint": ruleset.fingerprint, "rules": [r.id for r in ruleset.rules]})
                ok = True
        for listener in self.listeners:
            listener(ok)
        return ok

    def watch(self, interval: float) -> None:
        """Poll the folder every `interval` seconds in a daemon thread (once per process, fork-aware)."""
        if interval <= 0 or self._watcher_pid == os.getpid():
            return
        self._watcher_pid = os.getpid()

        def loop() -> None:
            while True:
                time.sleep(interval)
                try:
                    self.refresh()
                except Exception:  # the watcher must outlive any surprise; the serving set is untouched
                    log.exception("rule watcher failed", extra={"event": "rules_watch_error"})

        threading.Thread(target=loop, name="rules-watcher", daemon=True).start()

    def status(self) -> dict:
        """Describe what is serving and whether the last reload failed."""
        current = self._current
        return {
            "fingerprint": current.fingerprint,
            "loaded_at": current.loaded_at.isoformat(),
            "rules": [r.id for r in current.rules],
            "valuesets": sorted(current.valuesets),
            "last_reload_attempt": self.last_attempt.isoformat() if self.last_attempt else None,
            "last_reload_errors": self.last_error,
        }
