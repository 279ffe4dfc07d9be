"""The strict layer: every row of service.patient.strict.ROWS rejects what FHIR R4 rejects in its element.

Each case starts from a valid FHIR R4 resource, breaks one element the engine reads and
expects the problem to name that element; elements the engine does not read never matter.
"""
from __future__ import annotations

import copy

import pytest

from service.patient.strict import ROWS, Invariant, Row, strict_problem
from service.patient.validation import validation_error

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

OBSERVATION = {
    "resourceType": "Observation",
    "id": "ca-1",
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
    "code": {"coding": [{"system": LOINC, "code": "17861-6", "display": "Calcium [Mass/volume] in Serum or Plasma"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2026-10-28T07:30:00Z",
    "issued": "2026-10-28T11:30:00.250+01:00",
    "performer": [{"reference": "Organization/lab"}],
    "valueQuantity": {"value": 10.3, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
    "referenceRange": [{"low": {"value": 8.5, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
                        "high": {"value": 10.5, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}}],
}
CONDITION = {
    "resourceType": "Condition",
    "id": "esrd",
    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
    "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "46177005", "display": "End-stage renal disease"}]},
    "subject": {"reference": "Patient/p1"},
    "onsetDateTime": "2021-03",
    "recordedDate": "2021-03-15",
}
PROCEDURE = {
    "resourceType": "Procedure",
    "id": "hd-1",
    "status": "completed",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "302497006", "display": "Hemodialysis"}]},
    "subject": {"reference": "Patient/p1"},
    "performedPeriod": {"start": "2026-10-20T08:00:00Z", "end": "2026-10-20T12:00:00Z"},
}
SERVICE_REQUEST = {
    "resourceType": "ServiceRequest",
    "id": "order-1",
    "status": "draft",
    "intent": "proposal",
    "priority": "routine",
    "code": {"coding": [{"system": LOINC, "code": "2731-8", "display": "Parathyrin.intact"}]},
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2026-10-30",
}
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1961-04-12"}
MEDICATION_REQUEST = {
    "resourceType": "MedicationRequest",
    "id": "rx-1",
    "status": "draft",
    "intent": "order",
    "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1191", "display": "aspirin"}]},
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2026-10-30T10:00:00Z",
}
MEDICATION = {"resourceType": "Medication", "id": "med-1", "code": {"text": "calcium carbonate 500 mg tablet"}}

VALID = {r["resourceType"]: r for r in (OBSERVATION, CONDITION, PROCEDURE, SERVICE_REQUEST, PATIENT, MEDICATION_REQUEST, MEDICATION)}


def changed(resource: dict, **changes) -> dict:
    out = copy.deepcopy(resource)
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        else:
            out[key] = value
    return out


DELETE = object()

# (resource, change, the element the problem must name)
BROKEN = [
    # Observation
    (OBSERVATION, {"resourceType": 7}, "resourceType"),
    (OBSERVATION, {"id": "ca 1"}, "Observation.id"),
    (OBSERVATION, {"id": "x" * 65}, "Observation.id"),
    (OBSERVATION, {"status": "bogus"}, "Observation.status"),
    (OBSERVATION, {"status": DELETE}, "Observation.status"),
    (OBSERVATION, {"code": DELETE}, "Observation.code"),
    (OBSERVATION, {"code": {"coding": [{"system": LOINC, "code": " 17861-6"}]}}, "Observation.code"),
    (OBSERVATION, {"code": {"coding": {"system": LOINC}}}, "Observation.code"),
    (OBSERVATION, {"code": {"text": ""}}, "Observation.code"),
    (OBSERVATION, {"subject": {"reference": 5}}, "Observation.subject"),
    (OBSERVATION, {"subject": "Patient/p1"}, "Observation.subject"),
    (OBSERVATION, {"effectiveDateTime": "2026-02-30"}, "Observation.effectiveDateTime"),
    (OBSERVATION, {"effectiveDateTime": "2026-10-28T07:30:00"}, "Observation.effectiveDateTime"),
    (OBSERVATION, {"effectiveInstant": "2026-10-28T07:30:00Z"}, "Observation.effective[x]"),
    (OBSERVATION, {"effectiveDateTime": DELETE, "effectivePeriod": {"start": "2026-10-28", "end": "2026-10-27"}}, "Observation.effectivePeriod"),
    (OBSERVATION, {"effectiveDateTime": DELETE, "effectivePeriod": {"start": "yesterday"}}, "Observation.effectivePeriod.start"),
    (OBSERVATION, {"issued": "2026-10-28"}, "Observation.issued"),
    (OBSERVATION, {"valueQuantity": {"value": "10.3", "unit": "mg/dL"}}, "Observation.valueQuantity.value"),
    (OBSERVATION, {"valueQuantity": {"value": True}}, "Observation.valueQuantity.value"),
    (OBSERVATION, {"valueQuantity": {"value": 10 ** 400}}, "Observation.valueQuantity.value"),
    (OBSERVATION, {"valueQuantity": {"value": 10.3, "comparator": "~"}}, "Observation.valueQuantity.comparator"),
    (OBSERVATION, {"valueQuantity": {"value": 10.3, "unit": 5}}, "Observation.valueQuantity.unit"),
    (OBSERVATION, {"valueQuantity": {"value": 10.3, "code": "mg/dL "}}, "Observation.valueQuantity.code"),
    (OBSERVATION, {"valueString": "10.3"}, "Observation.value[x]"),
    (OBSERVATION, {"dataAbsentReason": {"text": "not performed"}}, "Observation.dataAbsentReason"),
    (OBSERVATION, {"valueQuantity": DELETE, "dataAbsentReason": "error"}, "Observation.dataAbsentReason"),
    (OBSERVATION, {"referenceRange": [{"high": {"value": 10.5, "comparator": "<"}}]}, "Observation.referenceRange"),
    (OBSERVATION, {"referenceRange": [{"appliesTo": []}]}, "Observation.referenceRange"),
    (OBSERVATION, {"referenceRange": {"high": {"value": 10.5}}}, "Observation.referenceRange"),
    (OBSERVATION, {"referenceRange": [{"high": {"value": "10.5"}}]}, "Observation.referenceRange[0].high.value"),
    # Condition
    (CONDITION, {"id": "esrd/1"}, "Condition.id"),
    (CONDITION, {"clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "current"}]}}, "Condition.clinicalStatus"),
    (CONDITION, {"clinicalStatus": {"text": "active"}}, "Condition.clinicalStatus"),
    (CONDITION, {"clinicalStatus": "active"}, "Condition.clinicalStatus"),
    (CONDITION, {"verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "yes"}]}}, "Condition.verificationStatus"),
    (CONDITION, {"verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "entered-in-error"}]}}, "Condition.clinicalStatus"),
    (CONDITION, {"code": {"coding": [{"system": "not a uri", "code": "46177005"}]}}, "Condition.code"),
    (CONDITION, {"subject": DELETE}, "Condition.subject"),
    (CONDITION, {"onsetDateTime": "March 2021"}, "Condition.onsetDateTime"),
    (CONDITION, {"onsetString": "in 2021"}, "Condition.onset[x]"),
    (CONDITION, {"recordedDate": "2021-13-01"}, "Condition.recordedDate"),
    # Procedure
    (PROCEDURE, {"id": ""}, "Procedure.id"),
    (PROCEDURE, {"status": "done"}, "Procedure.status"),
    (PROCEDURE, {"status": DELETE}, "Procedure.status"),
    (PROCEDURE, {"code": {"coding": "302497006"}}, "Procedure.code"),
    (PROCEDURE, {"subject": {"reference": ""}}, "Procedure.subject"),
    (PROCEDURE, {"performedPeriod": {"start": "2026-10-20T08:00:00Z", "end": "2026-10-19"}}, "Procedure.performedPeriod"),
    (PROCEDURE, {"performedDateTime": "2026-10-20"}, "Procedure.performed[x]"),
    # ServiceRequest
    (SERVICE_REQUEST, {"id": 42}, "ServiceRequest.id"),
    (SERVICE_REQUEST, {"status": "proposed"}, "ServiceRequest.status"),
    (SERVICE_REQUEST, {"intent": DELETE}, "ServiceRequest.intent"),
    (SERVICE_REQUEST, {"priority": "high"}, "ServiceRequest.priority"),
    (SERVICE_REQUEST, {"code": []}, "ServiceRequest.code"),
    (SERVICE_REQUEST, {"subject": DELETE}, "ServiceRequest.subject"),
    (SERVICE_REQUEST, {"occurrenceDateTime": "soon"}, "ServiceRequest.occurrenceDateTime"),
    (SERVICE_REQUEST, {"authoredOn": "2026-10-30T10:00"}, "ServiceRequest.authoredOn"),
    # MedicationRequest and Medication (draft orders)
    (MEDICATION_REQUEST, {"id": "rx 1"}, "MedicationRequest.id"),
    (MEDICATION_REQUEST, {"status": "new"}, "MedicationRequest.status"),
    (MEDICATION_REQUEST, {"intent": "directive"}, "MedicationRequest.intent"),
    (MEDICATION_REQUEST, {"medicationCodeableConcept": DELETE}, "MedicationRequest.medication[x]"),
    (MEDICATION_REQUEST, {"medicationReference": {"reference": "Medication/med-1"}}, "MedicationRequest.medication[x]"),
    (MEDICATION_REQUEST, {"medicationCodeableConcept": DELETE, "medicationReference": {"reference": ["Medication/med-1"]}}, "MedicationRequest.medicationReference"),
    (MEDICATION_REQUEST, {"subject": {"display": ""}}, "MedicationRequest.subject"),
    (MEDICATION_REQUEST, {"authoredOn": "30/10/2026"}, "MedicationRequest.authoredOn"),
    (MEDICATION, {"id": "med_1"}, "Medication.id"),
    (MEDICATION, {"code": {"coding": [{"code": 1191}]}}, "Medication.code"),
    # Patient
    (PATIENT, {"id": "p 1"}, "Patient.id"),
    (PATIENT, {"gender": "F"}, "Patient.gender"),
    (PATIENT, {"birthDate": "1961-02-29"}, "Patient.birthDate"),
    (PATIENT, {"birthDate": "1961-04-12T00:00:00Z"}, "Patient.birthDate"),
]


@pytest.mark.parametrize("resource", VALID.values(), ids=list(VALID))
def test_valid_fhir_r4_resources_pass_both_the_strict_layer_and_full_validation(resource):
    assert strict_problem(resource) is None
    assert validation_error(resource) is None


@pytest.mark.parametrize(("resource", "change", "element"), BROKEN, ids=[f"{r['resourceType']}-{i}" for i, (r, _, _) in enumerate(BROKEN)])
def test_a_broken_element_the_engine_reads_makes_the_resource_unreadable_and_is_named(resource, change, element):
    problem = strict_problem(changed(resource, **change))
    assert problem is not None
    assert problem.startswith(element), problem


def test_every_row_and_invariant_of_the_table_is_exercised_by_a_broken_case():
    problems = [strict_problem(changed(r, **c)) or "" for r, c, _ in BROKEN]
    for kind, rows in ROWS.items():
        for row in rows:
            if isinstance(row, Row):
                names = (row.element, *(f"{kind}.{key}" for key in row.properties))
                assert any(p.startswith(names) for p in problems), f"no broken case for {row.element}"
            else:
                assert any(f"({row.key})" in p for p in problems), f"no broken case for {row.key}"


@pytest.mark.parametrize("change", [
    {"performer": [{"reference": 5}]},
    {"performer": "the lab"},
    {"interpretation": "N"},
    {"note": [{"text": 5}]},
    {"meta": {"lastUpdated": "yesterday"}},
    {"specimen": {"reference": ["Specimen/1"]}},
    {"someLocalExtensionField": {"x": 1}},
])
def test_elements_the_engine_does_not_read_never_disqualify_a_result(change):
    broken = changed(OBSERVATION, **change)
    assert validation_error(broken) is not None  # full validation would have skipped this calcium result
    assert strict_problem(broken) is None


def test_what_fhir_resources_lets_through_the_strict_layer_stops():
    # fhir.resources checks structure, not codes or invariants the engine relies on.
    for change in ({"status": "bogus"}, {"valueQuantity": {"value": "10.3"}}, {"valueQuantity": {"value": 10.3, "comparator": "~"}},
                   {"dataAbsentReason": {"text": "error"}}):
        broken = changed(OBSERVATION, **change)
        assert validation_error(broken) is None
        assert strict_problem(broken) is not None


def test_a_period_ending_in_a_partial_date_covers_that_whole_period():
    assert strict_problem(changed(PROCEDURE, performedPeriod={"start": "2023-05-01", "end": "2023"})) is None
    assert strict_problem(changed(PROCEDURE, performedPeriod={"start": "2023-05-01", "end": "2023-04-30"})) is not None


def test_null_elements_are_absent_and_optional_ones_may_be_missing():
    sparse = {"resourceType": "Observation", "status": "final", "code": {"text": "Calcium"}, "issued": None, "valueQuantity": None}
    assert strict_problem(sparse) is None


def test_a_resource_of_another_type_than_expected_is_refused():
    assert strict_problem(PATIENT, "Observation") == "resourceType: 'Patient', expected 'Observation'"
    assert strict_problem({"resourceType": "Basic"}).startswith("resourceType")
    assert strict_problem(["not", "a", "resource"]) == "not a JSON object"


def test_an_extension_nested_past_the_stack_is_invalid_under_full_validation_not_a_crash():
    extension = {"url": "http://example.org/x", "valueString": "a"}
    for _ in range(900):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    deep = changed(OBSERVATION, extension=[extension])
    assert validation_error(deep) == "nested too deeply to validate"
    assert strict_problem(deep) is None  # the engine never reads extensions
