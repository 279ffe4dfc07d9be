"""The secret behind the keyed hashes that stand for patients in the store (CDS_PATIENT_KEY).

With client authentication on (production) the key must be configured: a key made up at
start would differ between deployments and restarts, and every snooze would be lost. For
local demos (`make run`, auth disabled) one is generated once into data/ and reused.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16


class PatientKeyError(SystemExit):
    """The patient key is missing or unusable; start-up stops with this message."""


def patient_secret(configured: str, key_file: str, *, required: bool) -> bytes:
    """Return the key bytes: CDS_PATIENT_KEY, else (when not required) the local key file, made if absent."""
    if configured:
        if len(configured) < MIN_KEY_LENGTH:
            raise PatientKeyError(f"CDS_PATIENT_KEY is too short: use at least {MIN_KEY_LENGTH} random characters "
                            "(e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))')")
        return configured.encode()
    if required:
        raise PatientKeyError("CDS_PATIENT_KEY is not set: with client authentication enabled the service needs a "
                        "secret for the keyed hashes that stand for patients in the store (at least "
                        f"{MIN_KEY_LENGTH} random characters, the same for every worker and restart)")
    return _local_key(Path(key_file))


def _local_key(path: Path) -> bytes:
    """Read the generated local key, or create it (owner-only) if this is the first start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text(encoding="ascii").strip()
        if len(key) < MIN_KEY_LENGTH:
            raise PatientKeyError(f"{path}: the local patient key is empty or too short; delete the file to make a new one") from None
        return key.encode()
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key + "\n")
    log.warning("generated a local patient key (auth is disabled; set CDS_PATIENT_KEY in production)",
                extra={"event": "patient_key_generated", "path": str(path)})
    return key.encode()
