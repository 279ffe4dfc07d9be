"""Shared fixtures: the app on the real rule set, a test client, fixture scenarios as hook requests."""
from __future__ import annotations

import io
import itertools
import logging
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from service import create_app
from service.config import PROJECT_ROOT
from service.logs import JsonFormatter

FIXTURES = PROJECT_ROOT / "fixtures" / "fhir"
RULES = PROJECT_ROOT / "rules"
# Every scenario in fixtures/fhir/ is written for this moment (its Bundle.timestamp).
SCENARIO_TIME = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
# The secret behind the store's patient hashes (CDS_PATIENT_KEY); production requires one.
TEST_PATIENT_KEY = "test-patient-key-not-a-secret"


def make_app(tmp_path: Path, **overrides):
    """Build the app as `make run` would, with a fixed clock, predictable uuids and a temporary store."""
    counter = itertools.count(1)
    config = {
        "TESTING": True,
        "AUTH": "disabled",
        "CLOCK": lambda: SCENARIO_TIME,
        "UUID": lambda: f"00000000-0000-4000-8000-{next(counter):012d}",
        "RULES_POLL_SECONDS": 0,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PUBLIC_BASE_URL": "https://cds.example.org",
        "PATIENT_KEY": TEST_PATIENT_KEY,
    }
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def log_lines():
    """The service's JSON log lines written during the test, parsed (call it to read them)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    yield lambda: [orjson.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
