"""Bulk NDJSON lines are attributed to their patient however the server wrote the reference."""
from __future__ import annotations

import json

import pytest

from service.screening.ndjson import BY_UUID, ReadReport, place_group, read_lines

UUID = "8f1d6b0e-3c1a-4f7e-9a55-2b8c0d4e6f10"


def observation(reference: str | None, key: str = "subject") -> bytes:
    resource = {
        "resourceType": "Observation", "id": "ca-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]},
        "valueQuantity": {"value": 10.4, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }
    if reference is not None:
        resource[key] = {"reference": reference}
    return json.dumps(resource).encode()


def read(*lines: bytes, keep_types=None) -> tuple[list[tuple[str, str, bytes]], ReadReport]:
    report = ReadReport()
    return list(read_lines(lines, "Observation.ndjson", report, keep_types)), report


@pytest.mark.parametrize("reference, patient", [
    ("Patient/p-1", "p-1"),
    ("Patient/p-1/_history/4", "p-1"),
    ("https://fhir.example.org/r4/Patient/p-1", "p-1"),
    ("http://127.0.0.1:8080/fhir/Patient/p-1/_history/2", "p-1"),
    (f"urn:uuid:{UUID}", UUID),
])
def test_each_way_a_server_writes_a_patient_reference_attributes_the_line(reference, patient):
    found, report = read(observation(reference))
    assert [(p, line) for p, _, line in found] == [(patient, observation(reference))]
    assert report.lines == 1 and report.unattributable_total == 0 and report.unreadable == 0


def test_a_patient_reference_under_patient_rather_than_subject_is_used():
    found, _ = read(observation("Patient/p-2", key="patient"))
    assert [p for p, _, _ in found] == ["p-2"]


def test_a_patient_line_is_attributed_by_its_own_id():
    found, _ = read(json.dumps({"resourceType": "Patient", "id": UUID, "gender": "female"}).encode())
    assert [p for p, _, _ in found] == [UUID]


@pytest.mark.parametrize("line, reason", [
    (observation("Group/renal-unit"), "subject is a Group, not a Patient"),
    (observation(None), "no subject or patient reference"),
    (observation("urn:uuid:not-a-uuid"), "subject reference is not a Patient reference"),
    (observation("#contained-patient"), "subject reference is not a Patient reference"),
    (json.dumps({"resourceType": "Patient", "gender": "male"}).encode(), "a Patient without a valid id"),
])
def test_a_line_that_names_no_patient_is_counted_with_its_reason_not_dropped(line, reason):
    found, report = read(observation("Patient/p-1"), line)
    assert [p for p, _, _ in found] == ["p-1"]
    assert report.unattributable == {reason: 1}
    assert report.examples == [f"Observation.ndjson:2: {json.loads(line)['resourceType']}: {reason}"]
    assert any(reason in text for text in report.lines_of_text())


def test_unreadable_lines_are_counted_and_blank_lines_ignored():
    found, report = read(b"{not json", b"", b"[1, 2]", b'{"id": "x"}', observation("Patient/p-1"))
    assert len(found) == 1
    assert report.unreadable == 3 and report.lines == 4
    assert report.examples[0].startswith("Observation.ndjson:1: not a JSON resource")


def test_a_line_that_is_not_utf8_is_unreadable_and_one_in_utf8_is_read():
    latin1 = observation("Patient/p-1").replace(b'"status"', '"note": [{"text": "Ca\u00b2\u207a \u00e9lev\u00e9"}], "status"'.encode("latin-1", "replace"))
    utf8 = observation("Patient/p-2").replace(b'"status"', '"note": [{"text": "Ca\u00b2\u207a \u00e9lev\u00e9"}], "status"'.encode())
    found, report = read(latin1, utf8)
    assert [p for p, _, _ in found] == ["p-2"]
    assert report.unreadable == 1 and report.lines == 2
    assert report.examples[0].startswith("Observation.ndjson:1: not UTF-8")


def test_types_no_rule_reads_are_skipped_and_counted_when_asked():
    procedure = json.dumps({"resourceType": "Procedure", "id": "dx", "status": "completed", "subject": {"reference": "Patient/p-1"}}).encode()
    found, report = read(observation("Patient/p-1"), procedure, keep_types=frozenset({"Observation", "Patient"}))
    assert len(found) == 1 and report.skipped == {"Procedure": 1}


def test_urn_uuid_lines_whose_patient_is_not_in_the_export_become_unattributable_once_grouped():
    report = ReadReport()
    kept = place_group(UUID, [(BY_UUID, observation(f"urn:uuid:{UUID}"))], report)
    assert kept == []
    assert report.unattributable == {"urn:uuid reference names no Patient in the export": 1}
    patient = json.dumps({"resourceType": "Patient", "id": UUID}).encode()
    assert len(place_group(UUID, [(BY_UUID, observation(f"urn:uuid:{UUID}")), ("id", patient)], ReadReport())) == 2


def test_a_relative_reference_keeps_its_lines_even_without_the_patient_resource():
    # A Bulk export asked for with _type=Observation has no Patient file: the id still names the patient.
    report = ReadReport()
    assert len(place_group("p-1", [("reference", observation("Patient/p-1"))], report)) == 1
    assert report.unattributable_total == 0


def test_partial_reports_merge_into_totals():
    _, a = read(observation("Group/g"))
    _, b = read(b"oops", observation(None))
    merged = ReadReport().merge(a).merge(b)
    assert merged.lines == 3 and merged.unreadable == 1 and merged.unattributable_total == 2
