"""`screen --from-fhir`: the Bulk Data $export client against a small Bulk Data server on 127.0.0.1."""
from __future__ import annotations

import csv
import email.utils
import re
import time
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.console import load_rules
from service.config import PROJECT_ROOT
from service.screening import bulk_export
from service.screening.bulk_export import BulkClient, BulkExportError, NoAuth, StaticToken, retry_after, run_export, type_filters
from service.screening.command import main
from tests.bulk_server import BulkServerConfig, serve_bulk
from tests.synthetic import write_bulk_export

NOW = "2026-11-01T12:00:00Z"
RULESET = load_rules(str(PROJECT_ROOT / "rules"))
ISSUE = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                         "diagnostics": "Observation/lab-77: could not be exported (storage error)"}]}


def export_files(tmp_path: Path, patients: int = 60, seed: int = 21):
    """A synthetic export as a server would serve it: Observations split over two files."""
    export = write_bulk_export(tmp_path / "source", patients, seed=seed)
    observations = (export.folder / "Observation.ndjson").read_bytes().splitlines(keepends=True)
    half = len(observations) // 2
    files = {
        "patients.ndjson": ("Patient", (export.folder / "Patient.ndjson").read_bytes()),
        "observations-1.ndjson": ("Observation", b"".join(observations[:half])),
        "observations-2.ndjson": ("Observation", b"".join(observations[half:])),
        "conditions.ndjson": ("Condition", (export.folder / "Condition.ndjson").read_bytes()),
    }
    return export, files


def flagged(path: Path) -> dict[str, tuple[str, ...]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return {r["patient"]: tuple(r["rules"].split()) for r in csv.DictReader(handle)}


def pem_file(tmp_path: Path, key) -> Path:
    path = tmp_path / "client.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_a_smart_backend_services_export_is_polled_downloaded_and_screened_through_429s_expired_tokens_and_a_broken_transfer(tmp_path, capsys, monkeypatch, key_type):
    monkeypatch.setattr(bulk_export, "CHUNK", 4096)  # so the half that arrives before the break is kept
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_type == "rsa" else ec.generate_private_key(ec.SECP384R1())
    export, files = export_files(tmp_path)
    config = BulkServerConfig(
        files, errors=[ISSUE], smart_client_id="screening-service", smart_public_key=key.public_key(),
        token_uses=4,  # tokens stop working part-way through the downloads
        kickoff_429s=1, polls_in_progress=2, break_first_transfer_of="observations-2.ndjson",
    )
    out = tmp_path / "flagged.csv"
    with serve_bulk(config) as server:
        code = main(["--from-fhir", f"{server.base}/fhir", "--group", "renal-unit", "--out", str(out),
                     "--download-dir", str(tmp_path / "download"), "--engine", "processes", "--workers", "1", "--now", NOW,
                     "--no-progress", "--smart-client-id", "screening-service", "--smart-key", str(pem_file(tmp_path, key))])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # the server reported an error file: the run says the result may be incomplete
    assert flagged(out) == export.flagged

    kickoffs = [s for s in server.seen if s.path.endswith("/$export")]
    assert [s.status for s in kickoffs] == [429, 202]
    assert kickoffs[-1].path == "/fhir/Group/renal-unit/$export"
    assert kickoffs[-1].headers["Prefer"] == "respond-async" and kickoffs[-1].headers["Accept"] == "application/fhir+json"
    assert kickoffs[-1].query["_type"] == ["Patient,Observation,Condition,Procedure"]
    observation_filter = next(f for f in kickoffs[-1].query["_typeFilter"] if f.startswith("Observation?code="))
    assert "http://loinc.org|17861-6" in observation_filter and "http://loinc.org|2777-1" in observation_filter
    assert [s.status for s in server.seen if s.path == "/status/job-1" and s.status != 401] == [202, 202, 200]
    assert any(s.status == 401 for s in server.seen)  # a token expired mid-way ...
    assert server.tokens_issued >= 2  # ... and a new one was fetched with a new signed assertion
    ranges = [s for s in server.seen if s.path == "/files/observations-2.ndjson"]
    assert [s.status for s in ranges][-1] == 206 and ranges[-1].headers["Range"].startswith("bytes=")  # resumed, not restarted
    assert "429 Too Many Requests, waiting 1 s" in captured.err
    assert "status: in progress (50% exported)" in captured.err and "(100% exported)" in captured.err
    assert re.search(r"Observation\.002\.ndjson interrupted after [1-9][\d,]* bytes", captured.err)
    assert re.search(r"3/4 Observation\.002\.ndjson \([\d,]+ bytes, resumed\)", captured.err)
    assert (tmp_path / "download" / "Observation.002.ndjson").read_bytes() == files["observations-2.ndjson"][1]
    assert "the server reported 1 error(s) in 1 error file(s)" in captured.err
    assert "Observation/lab-77: could not be exported (storage error)" in captured.err
    assert f"screened {len(export.profiles)} patients" in captured.out
    assert all("Authorization" not in s.headers or s.headers["Authorization"].startswith("Bearer ") for s in server.seen)
    assert not any(key_text in captured.err + captured.out for key_text in ("BEGIN PRIVATE KEY", "access_token"))


def test_a_static_token_export_without_type_filter_support_exports_without_it_and_exits_0(tmp_path, capsys):
    export, files = export_files(tmp_path, patients=30, seed=8)
    config = BulkServerConfig(files, static_token="static-secret", capability_type_filter=False, polls_in_progress=0)
    out = tmp_path / "flagged.csv"
    with serve_bulk(config) as server:
        code = main(["--from-fhir", f"{server.base}/fhir", "--out", str(out), "--token", "static-secret",
                     "--engine", "processes", "--workers", "1", "--now", NOW, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert flagged(out) == export.flagged
    kickoff = next(s for s in server.seen if s.path.endswith("/$export"))
    assert kickoff.path == "/fhir/Patient/$export" and "_typeFilter" not in kickoff.query
    assert "not used (the server does not list it)" in captured.err
    assert (tmp_path / "flagged-export" / "Observation.001.ndjson").exists()  # the default folder, beside --out
    assert "static-secret" not in captured.err + captured.out


def test_a_wrong_static_token_fails_at_kick_off_naming_the_servers_outcome(tmp_path, capsys):
    _, files = export_files(tmp_path, patients=5)
    with serve_bulk(BulkServerConfig(files, static_token="right")) as server:
        code = main(["--from-fhir", f"{server.base}/fhir", "--out", str(tmp_path / "f.csv"), "--token", "wrong", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "export failed: kick-off" in err and "HTTP 401" in err and "token missing, wrong or expired" in err


def test_an_export_the_server_fails_reports_its_operation_outcome_and_exits_1(tmp_path, capsys):
    _, files = export_files(tmp_path, patients=5)
    failure = (500, {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "exception", "diagnostics": "export job crashed"}]})
    with serve_bulk(BulkServerConfig(files, status_failure=failure, polls_in_progress=0)) as server:
        code = main(["--from-fhir", f"{server.base}/fhir", "--out", str(tmp_path / "f.csv"), "--no-progress"])
    assert code == 1
    assert "export failed, HTTP 500 (fatal exception: export job crashed)" in capsys.readouterr().err


def test_ctrl_c_while_polling_sends_delete_to_the_status_url(tmp_path):
    _, files = export_files(tmp_path, patients=5)

    def interrupted_sleep(seconds):
        raise KeyboardInterrupt

    with serve_bulk(BulkServerConfig(files, polls_in_progress=3)) as server, requests.Session() as session:
        client = BulkClient(f"{server.base}/fhir", NoAuth(), session, say=lambda line: None, sleep=interrupted_sleep)
        with pytest.raises(KeyboardInterrupt):
            run_export(client, tmp_path / "download", None, [])
    assert server.deleted == ["/status/job-1"]
    assert not (tmp_path / "download" / "export.state").exists()  # a rerun starts a new export


def test_a_rerun_resumes_from_the_saved_manifest_and_downloads_only_what_is_missing(tmp_path):
    _, files = export_files(tmp_path, patients=10)
    folder = tmp_path / "download"
    with serve_bulk(BulkServerConfig(files, polls_in_progress=0)) as server, requests.Session() as session:
        client = BulkClient(f"{server.base}/fhir", NoAuth(), session, say=lambda line: None)
        first = run_export(client, folder, None, [])
        (folder / "Condition.001.ndjson").unlink()
        second = run_export(client, folder, None, [])
    assert [f.name for f in first.files] == [f.name for f in second.files]
    assert len([s for s in server.seen if s.path.endswith("/$export")]) == 1
    assert [s.path for s in server.seen if s.path.startswith("/files/")].count("/files/conditions.ndjson") == 2
    assert [s.path for s in server.seen if s.path.startswith("/files/")].count("/files/patients.ndjson") == 1


def test_a_file_larger_than_the_limit_is_stopped_not_downloaded_whole(tmp_path):
    _, files = export_files(tmp_path, patients=20)
    with serve_bulk(BulkServerConfig(files, polls_in_progress=0)) as server, requests.Session() as session:
        client = BulkClient(f"{server.base}/fhir", StaticToken("t"), session, say=lambda line: None, max_file_bytes=1000)
        with pytest.raises(BulkExportError, match="larger than 1,000 bytes"):
            run_export(client, tmp_path / "download", None, [])


def test_a_download_folder_holding_another_exports_files_is_refused(tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "Observation.001.ndjson").write_text("{}\n")
    with requests.Session() as session:
        client = BulkClient("http://127.0.0.1:9/fhir", NoAuth(), session, say=lambda line: None)
        with pytest.raises(BulkExportError, match="already holds NDJSON files"):
            run_export(client, folder, None, [])


def test_retry_after_reads_seconds_and_http_dates_and_caps_the_wait():
    now = time.time()
    assert retry_after("7") == 7
    assert retry_after(email.utils.formatdate(now + 20, usegmt=True), lambda: now) == pytest.approx(20, abs=1.5)
    assert retry_after("86400") == 300
    assert retry_after("soon") is None and retry_after(None) is None


def test_type_filters_select_the_rules_codes_and_skip_a_type_whose_value_sets_have_prefixes():
    filters = type_filters(RULESET)
    observation = next(f for f in filters if f.startswith("Observation?code="))
    assert "http://loinc.org|2731-8" in observation  # intact PTH
    condition_sets = [RULESET.valuesets[n] for n in RULESET.condition_valuesets()]
    has_prefix = any(vs.prefixes for vs in condition_sets)
    assert any(f.startswith("Condition?code=") for f in filters) is (not has_prefix)
