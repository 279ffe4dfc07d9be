"""Configuration: embedded defaults, overridden by CDS_* environment variables.

`make run` works with the defaults alone: rules from ./rules, SQLite under ./data,
no external services.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# key -> (environment variable, default)
SETTINGS: dict[str, tuple[str, object]] = {
    "RULES_DIR": ("CDS_RULES_DIR", str(PROJECT_ROOT / "rules")),
    "RULES_POLL_SECONDS": ("CDS_RULES_POLL_SECONDS", 2.0),
    "PUBLIC_BASE_URL": ("CDS_PUBLIC_BASE_URL", ""),
    "MAX_CONTENT_LENGTH": ("CDS_MAX_BODY_BYTES", 16 * 1024 * 1024),
    "FHIR_TIMEOUT": ("CDS_FHIR_TIMEOUT", 5.0),
    "FHIR_BUDGET": ("CDS_FHIR_BUDGET", 10.0),
    "FHIR_MAX_PAGES": ("CDS_FHIR_MAX_PAGES", 10),
    "FHIR_MAX_BYTES": ("CDS_FHIR_MAX_BYTES", 32 * 1024 * 1024),
    "FHIR_SERVERS": ("CDS_FHIR_SERVERS", ""),
    "PREFETCH_COUNT": ("CDS_PREFETCH_COUNT", 100),
    "FEEDBACK_MAX_ITEMS": ("CDS_FEEDBACK_MAX_ITEMS", 100),
    "AUTH": ("CDS_AUTH", "enabled"),
    "TRUSTED_ISSUERS": ("CDS_TRUSTED_ISSUERS", ""),
    "MAX_TOKEN_LIFETIME": ("CDS_MAX_TOKEN_LIFETIME", 300.0),
    "DATABASE_URL": ("CDS_DATABASE_URL", f"sqlite:///{Path.cwd() / 'data' / 'calcinosis-cds.db'}"),
    "CORS_ORIGINS": ("CDS_CORS_ORIGINS", "*"),
    "NOW": ("CDS_NOW", ""),
    "LOG_LEVEL": ("CDS_LOG_LEVEL", "INFO"),
    "ACCESS_LOG": ("CDS_ACCESS_LOG", True),
}


def from_environment(environ: dict[str, str] | None = None) -> dict:
    """Read the defaults, then any CDS_* variable that is set, cast to the default's type."""
    environ = os.environ if environ is None else environ
    config = {}
    for key, (variable, default) in SETTINGS.items():
        raw = environ.get(variable)
        if raw is None or raw == "":
            config[key] = default
        elif isinstance(default, bool):
            config[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            try:
                config[key] = type(default)(raw)
            except ValueError:
                raise SystemExit(f"{variable}={raw!r}: expected a {type(default).__name__}") from None
        else:
            config[key] = raw
    return config
