"""How the patient record indexes raw resources: bounded work on unreadable ones."""
from __future__ import annotations

import time

import msgspec

from service.engine.loader import load_ruleset
from service.patient import record as record_module
from service.patient.lazy import RawResource
from service.patient.record import MAX_DESCRIBED_UNREADABLE, PatientRecord
from tests.conftest import RULES

RULESET = load_ruleset(RULES)


def raw(resource: dict) -> RawResource:
    return RawResource(msgspec.Raw(msgspec.json.encode(resource)))


def test_fifty_thousand_resources_with_an_unreadable_code_are_counted_but_only_a_few_validated(monkeypatch):
    calls = []
    real = record_module.validation_error
    monkeypatch.setattr(record_module, "validation_error", lambda r: calls.append(1) or real(r))
    record = PatientRecord(RULESET.code_index, "p1")
    started = time.perf_counter()
    record.add_all(
        raw({"resourceType": "Observation", "id": f"o{i}", "status": "final", "code": "17861-6"}) for i in range(50_000)
    )
    elapsed = time.perf_counter() - started
    assert record.unreadable == 50_000
    assert record.skipped == 50_000  # every one is counted
    assert len(record.invalid) == MAX_DESCRIBED_UNREADABLE  # a bounded sample is described
    assert len(calls) == MAX_DESCRIBED_UNREADABLE  # validating each one took 7.9 s
    assert elapsed < 20  # backstop only
