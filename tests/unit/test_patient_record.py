"""How the patient record indexes raw resources: bounded work on unreadable ones."""
from __future__ import annotations

import time

import msgspec
import pytest

from service.engine.loader import load_ruleset
from service.engine.record import InvalidResource
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


def condition(reference: str = "Patient/p1", **fields) -> dict:
    return {
        "resourceType": "Condition", "id": "esrd",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "46177005"}]},
        "subject": {"reference": reference},
    } | fields


def test_a_matching_condition_whose_status_has_the_wrong_json_type_is_indexed_as_unreadable():
    record = PatientRecord(RULESET.code_index, "p1")
    record.add(raw(condition(clinicalStatus="active")))  # a string, not a CodeableConcept
    [entry] = record.conditions("kidney-failure")
    with pytest.raises(InvalidResource, match="clinicalStatus"):
        entry.check()


def test_every_reference_form_of_the_patient_is_attributed_and_others_are_counted():
    record = PatientRecord(RULESET.code_index, "p1", aliases={"urn:uuid:abc"}, base_url="http://127.0.0.1:9/fhir")
    forms = ["Patient/p1", "Patient/p1/_history/4", "http://127.0.0.1:9/fhir/Patient/p1", "http://127.0.0.1:9/fhir/Patient/p1/_history/2", "urn:uuid:abc"]
    for i, reference in enumerate(forms):
        record.add(condition(reference) | {"id": f"c{i}"})
    record.add(condition("Patient/p2") | {"id": "other"})
    record.add(condition("urn:uuid:not-the-patient") | {"id": "lost"})
    record.add(condition("http://elsewhere.invalid/fhir/Patient/p1") | {"id": "elsewhere"})
    assert sorted(e.resource_id for e in record.conditions("kidney-failure")) == [f"c{i}" for i in range(len(forms))]
    assert record.other_patient == 1
    assert record.unattributed == 2  # never dropped silently


def test_a_value_too_large_for_a_float_makes_the_resource_invalid_not_infinite():
    record = PatientRecord(RULESET.code_index, "p1")
    obs = {"resourceType": "Observation", "id": "huge", "status": "final", "effectiveDateTime": "2026-10-30",
           "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]}, "subject": {"reference": "Patient/p1"},
           "valueQuantity": {"value": int("9" * 400), "unit": "mg/dL", "code": "mg/dL"}}
    record.add(obs)
    [entry] = record.observations("total-calcium")
    with pytest.raises(InvalidResource, match="finite"):
        entry.reading()
