"""CDS_PATIENT_KEY: required in production, generated once for local demos, never a raw id in the store."""
from __future__ import annotations

import stat

import pytest

from service.identity import PatientKeyError, patient_secret
from service.store import patient_key
from tests.conftest import make_app


def test_production_without_a_key_stops_at_start_naming_the_variable(tmp_path):
    with pytest.raises(SystemExit, match="CDS_PATIENT_KEY is not set"):
        make_app(tmp_path, AUTH="enabled", PATIENT_KEY="")


def test_a_short_key_is_refused(tmp_path):
    with pytest.raises(PatientKeyError, match="too short"):
        patient_secret("abc", str(tmp_path / "unused"), required=True)


def test_without_auth_a_local_key_is_made_once_owner_only_and_reused(tmp_path):
    path = tmp_path / "data" / "patient-key"
    first = patient_secret("", str(path), required=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert patient_secret("", str(path), required=False) == first
    assert len(first) >= 32


def test_the_patient_hash_depends_on_the_key_the_server_and_the_id():
    key = b"k" * 32
    base = patient_key(key, "123", "https://ehr.example.org/fhir")
    assert len(base) == 64 and "123" not in base
    assert patient_key(key, "123", "https://ehr.example.org/fhir/") == base  # trailing slash is the same server
    assert patient_key(key, "124", "https://ehr.example.org/fhir") != base
    assert patient_key(key, "123", "https://other.example.org/fhir") != base
    assert patient_key(b"j" * 32, "123", "https://ehr.example.org/fhir") != base
