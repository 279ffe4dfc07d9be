"""`screen`: population screening on the process pool, a Dask LocalCluster and an external Dask cluster.

Exports come from tests/synthetic.py, which knows which patients each rule must flag. The
data is small (a few hundred patients) so each Dask run takes seconds; a LocalCluster's
start-up (~3 s) is most of it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from service.config import PROJECT_ROOT
from service.replay import main as replay_main
from service.screening.command import main
from tests.synthetic import write_bulk_export

NOW = "2026-11-01T12:00:00Z"
DASK = Path(sys.executable).with_name("dask")
ORPHAN_UUID = "0c5e7b1a-9d2f-4e3b-8a61-7f0e2d4c9b13"

# Lines no patient can be found for, appended to an export: each is counted, none screened.
STRAY_OBSERVATIONS = [
    {"resourceType": "Observation", "id": "group-ca", "status": "final", "subject": {"reference": "Group/renal-unit"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]}, "valueQuantity": {"value": 11.2, "unit": "mg/dL"}},
    {"resourceType": "Observation", "id": "orphan-ca", "status": "final", "subject": {"reference": f"urn:uuid:{ORPHAN_UUID}"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]}, "valueQuantity": {"value": 11.2, "unit": "mg/dL"}},
    {"resourceType": "Observation", "id": "no-subject", "status": "final",
     "code": {"coding": [{"system": "http://loinc.org", "code": "2777-1"}]}, "valueQuantity": {"value": 7.9, "unit": "mg/dL"}},
]
PROCEDURE = {"resourceType": "Procedure", "id": "skin-biopsy", "status": "completed", "subject": {"reference": "Patient/synth-000001"},
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "240977001"}]}}


def mixed_export(folder: Path, patients: int):
    """An export whose patients use every reference style, plus stray, unreadable (truncated, not UTF-8) and unread lines."""
    export = write_bulk_export(folder, patients, seed=5, references="mixed")
    with (folder / "Observation.ndjson").open("a") as handle:
        handle.writelines(json.dumps(o) + "\n" for o in STRAY_OBSERVATIONS)
        handle.write('{"resourceType": "Observation", "id": \n')  # truncated line
    with (folder / "Observation.ndjson").open("ab") as handle:  # a line written in Latin-1, not UTF-8
        handle.write(json.dumps({**STRAY_OBSERVATIONS[0], "id": "latin-1", "subject": {"reference": "Patient/synth-000002"},
                                 "note": [{"text": "\u00e9lev\u00e9"}]}, ensure_ascii=False).encode("latin-1") + b"\n")
    (folder / "Procedure.ndjson").write_text(json.dumps(PROCEDURE) + "\n")
    return export


def flagged_in(path: Path) -> dict[str, tuple[str, ...]]:
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return {r["patient"]: tuple(r["rules"].split()) for r in csv.DictReader(handle)}
    if path.suffix == ".parquet":
        table = pq.read_table(path).to_pylist()
        return {r["patient"]: tuple(r["rules"].split()) for r in table}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {r["patient"]: tuple(r["rules"]) for r in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dask_cluster_from_the_cli(tmp_path: Path, workers: int = 2, timeout: float = 60.0):
    """`dask scheduler` and `dask worker` processes on loopback, as on separate machines; yields the address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    log = (tmp_path / "dask.log").open("w")
    processes = [subprocess.Popen(
        [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--idle-timeout", "120s"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )]
    try:
        for _ in range(workers):
            processes.append(subprocess.Popen(
                [str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                 "--death-timeout", "30", "--lifetime", "180s", "--memory-limit", "1GB"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
        from distributed import Client

        deadline = time.monotonic() + timeout
        while True:  # the scheduler takes a moment to listen
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(workers, timeout=max(1.0, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()


def test_the_process_pool_a_local_cluster_and_an_external_dask_cluster_flag_the_same_patients(tmp_path, capsys):
    export = mixed_export(tmp_path / "export", 250)
    assert 40 < len(export.flagged) < 150
    outputs = {"pool": tmp_path / "pool.csv", "local": tmp_path / "local.ndjson", "external": tmp_path / "external.parquet"}
    summaries = {name: tmp_path / f"{name}.json" for name in outputs}
    common = [str(export.folder), "--now", NOW, "--no-progress"]

    assert main([*common, "--out", str(outputs["pool"]), "--engine", "processes", "--workers", "2", "--summary", str(summaries["pool"])]) == 0
    # A small block size splits every file: patients are spread over partitions and must be shuffled together.
    assert main([*common, "--out", str(outputs["local"]), "--workers", "2", "--blocksize", "32768", "--summary", str(summaries["local"])]) == 0
    with dask_cluster_from_the_cli(tmp_path) as address:
        assert main([*common, "--out", str(outputs["external"]), "--scheduler", address, "--blocksize", "32768", "--summary", str(summaries["external"])]) == 0
    capsys.readouterr()

    for name, path in outputs.items():
        assert flagged_in(path) == export.flagged, name
    loaded = {name: json.loads(path.read_text()) for name, path in summaries.items()}
    assert loaded["local"]["engine"] == "dask LocalCluster" and loaded["local"]["workers"] == 2
    assert loaded["external"]["engine"] == f"dask {address}" and loaded["external"]["workers"] == 2
    assert loaded["local"]["partitions"] > 3  # the small blocks really did split the files
    for summary in loaded.values():
        assert summary["patients_screened"] == 250
        assert summary["patients_flagged"] == len(export.flagged)
        assert summary["resources"]["unattributable_by_reason"] == {
            "subject is a Group, not a Patient": 1,
            "urn:uuid reference names no Patient in the export": 1,
            "no subject or patient reference": 1,
        }
        assert summary["resources"]["unreadable"] == 2
        assert summary["resources"]["skipped_by_type"] == {"Procedure": 1}
    assert len({s["rules_fingerprint"] for s in loaded.values()}) == 1
    assert loaded["external"]["peak_worker_rss_mb"] and all(0 < mb < 1024 for mb in loaded["external"]["peak_worker_rss_mb"].values())


def test_a_worker_screens_each_shuffled_partition_soon_after_unpacking_it(tmp_path):
    """Memory per worker stays flat as N grows only if a worker does not unpack every partition first.

    After the shuffle's barrier all of a worker's partitions can be unpacked at once; a worker
    that unpacks them all before screening any holds its whole share of the export.
    """
    from datetime import datetime

    from distributed import get_task_stream

    from service.console import load_rules
    from service.screening.distributed import connect, input_urls, screen_export

    export = write_bulk_export(tmp_path / "export", 1500, seed=6)
    client, cluster = connect(None, 1)
    try:
        with get_task_stream(client) as stream:
            result = screen_export(client, input_urls(str(export.folder)), load_rules(str(PROJECT_ROOT / "rules")),
                                   datetime.fromisoformat(NOW), blocksize=32768)
    finally:
        client.close()
        cluster.close()
    assert result.tally.screened == 1500 and result.partitions > 40

    def started(task) -> float:
        return min(s["start"] for s in task["startstops"] if s["action"] == "compute")

    waiting, most_waiting, unpacked, screened = 0, 0, 0, 0
    for task in sorted((t for t in stream.data if any(s["action"] == "compute" for s in t["startstops"])), key=started):
        name = str(task["key"][0] if isinstance(task["key"], tuple) else task["key"])
        if name.startswith("p2pshuffle-"):
            waiting, unpacked = waiting + 1, unpacked + 1
        elif name.startswith("_screen_frame-"):
            waiting, screened = waiting - 1, screened + 1
        most_waiting = max(most_waiting, waiting)
    assert unpacked == screened == result.partitions
    # A worker may run a few unpacks ahead while the scheduler tells it which screening task is
    # ready (these partitions take milliseconds); one that unpacks its whole share first does not.
    assert most_waiting <= unpacked // 4, f"{most_waiting} of {unpacked} partitions were unpacked before being screened"


def test_a_result_holding_a_number_out_of_range_is_reported_invalid_by_both_engines_and_the_run_goes_on(tmp_path, capsys):
    # 1e999 is valid JSON but no number Python can hold. A calcium result carrying it (here in an
    # extension) cannot be read; the engine skips it and reports it, and the rule uses the most
    # recent usable calcium-phosphate pair, which for this profile still qualifies: the flagged set
    # is the generator's. The process pool used to stop with a traceback on such a line.
    export = write_bulk_export(tmp_path / "export", 60, seed=5)
    patient = next(pid for pid, profile in export.profiles.items() if profile == "esrd-high-product")
    line = json.dumps({
        "resourceType": "Observation", "id": "calcium-out-of-range", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "17861-6"}]}, "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-10-31T08:00:00Z", "valueQuantity": {"value": 10.9, "unit": "mg/dL"},
        "extension": [{"url": "http://example.org/fhir/StructureDefinition/x", "valueDecimal": 0}],
    }).replace('"valueDecimal": 0', '"valueDecimal": 1e999')
    with (export.folder / "Observation.ndjson").open("a") as handle:
        handle.write(line + "\n")
    for engine in ("processes", "dask"):
        out, summary = tmp_path / f"{engine}.csv", tmp_path / f"{engine}.json"
        assert main([str(export.folder), "--out", str(out), "--engine", engine, "--workers", "1", "--now", NOW, "--no-progress",
                     "--summary", str(summary)]) == 0, engine
        assert flagged_in(out) == export.flagged, engine
        loaded = json.loads(summary.read_text())
        assert loaded["resources"]["skipped_by_type"] == {"invalid Observation": 1}, engine
        # One worker runs in the screen process, as the pool's one worker does.
        assert loaded["engine"] == {"processes": "processes", "dask": "dask LocalCluster (threads)"}[engine]
    capsys.readouterr()


def test_a_synthea_style_export_with_urn_uuid_references_screens_from_memory_and_writes_memory(tmp_path, capsys):
    import fsspec

    export = write_bulk_export(tmp_path / "export", 120, seed=9, references="uuid")
    assert all(len(pid) == 36 for pid in export.profiles)
    fs = fsspec.filesystem("memory")
    for file in export.folder.iterdir():
        fs.pipe(f"/bulk-uuid/{file.name}", file.read_bytes())
    try:
        assert main(["memory://bulk-uuid", "--out", "memory://results/flagged.csv", "--workers", "1", "--now", NOW, "--no-progress"]) == 0
        text = fs.cat("/results/flagged.csv").decode()
    finally:
        for folder in ("/bulk-uuid", "/results"):
            if fs.exists(folder):
                fs.rm(folder, recursive=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["patient"]: tuple(r["rules"].split()) for r in rows} == export.flagged
    out = capsys.readouterr().out
    assert "screened 120 patients" in out and "dask LocalCluster (threads)" in out
    assert "0 unattributable" in out


def test_each_row_has_the_rule_ids_and_the_values_with_their_units_and_dates(tmp_path, capsys):
    export = write_bulk_export(tmp_path / "export", 80, seed=3)
    out = tmp_path / "flagged.parquet"
    assert main([str(export.folder), "--out", str(out), "--workers", "1", "--now", NOW, "--no-progress"]) == 0
    rows = {r["patient"]: r for r in pq.read_table(out).to_pylist()}
    assert {p: tuple(r["rules"].split()) for p, r in rows.items()} == export.flagged
    risk = next(r for r in rows.values() if r["rules"] == "calciphylaxis-risk")
    assert risk["ca_x_p"].endswith(" mg²/dL²") and float(risk["ca_x_p"].split()[0]) >= 72
    assert risk["ca_x_p_date"].startswith("2026-") and risk["pth"].endswith("pg/mL") and risk["pth_date"].startswith("2026-")
    printed = capsys.readouterr().out
    for rule in {r for rules in export.flagged.values() for r in rules}:
        count = sum(rule in rules for rules in export.flagged.values())
        assert f"  {rule}: {count}\n" in printed
    assert "rules fingerprint " in printed and "patients/s" in printed and "peak memory per worker" in printed


def test_a_progress_bar_of_partitions_is_drawn_on_a_terminal(tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    export = write_bulk_export(tmp_path / "export", 30, seed=2)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([str(export.folder), "--out", str(tmp_path / "f.csv"), "--workers", "1", "--now", NOW, "--blocksize", "8192"]) == 0
    assert "screening:" in terminal.getvalue() and "partition" in terminal.getvalue()
    assert "screened 30 patients" in capsys.readouterr().out


def test_replay_reads_a_urn_uuid_export_patient_by_patient_and_reports_what_it_could_not_attribute(tmp_path, capsys):
    export = write_bulk_export(tmp_path / "export", 40, seed=4, references="uuid")
    with (export.folder / "Observation.ndjson").open("a") as handle:
        handle.write(json.dumps(STRAY_OBSERVATIONS[1]) + "\n")
    assert replay_main([str(export.folder), "--json", "--now", NOW, "--no-progress"]) == 0
    captured = capsys.readouterr()
    by_patient = {o["patient"]: tuple(o["rules"]) for o in map(json.loads, captured.out.splitlines())}
    assert set(by_patient) == set(export.profiles)
    assert {p: r for p, r in by_patient.items() if r} == export.flagged
    assert "1 resource(s) unattributable to a patient: 1 urn:uuid reference names no Patient in the export" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.csv"], "give a SOURCE"),
    (["export", "--out", "x.xlsx"], "must end in .csv, .ndjson or .parquet"),
    (["export", "--out", "x.csv", "--engine", "processes", "--scheduler", "tcp://127.0.0.1:1"], "does not combine"),
    (["export", "--out", "x.csv", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "has its own workers"),
    (["export", "--out", "x.csv", "--group", "g"], "use it with --from-fhir"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_folder_without_ndjson_exits_2_before_any_cluster_starts(tmp_path, capsys, monkeypatch):
    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for input that cannot be read")

    monkeypatch.setattr("service.screening.distributed.connect", no_cluster)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "f.csv")]) == 2
    assert f"{tmp_path / 'empty'}: no *.ndjson files in it" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "f.csv")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_an_unreachable_scheduler_exits_2_within_the_connect_timeout(tmp_path, capsys):
    export = write_bulk_export(tmp_path / "export", 5, seed=1)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    assert main([str(export.folder), "--out", str(tmp_path / "f.csv"), "--scheduler", address, "--connect-timeout", "2"]) == 2
    assert time.monotonic() - started < 15
    assert f"cannot reach the Dask scheduler at {address}" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["processes", "dask"])
def test_a_run_past_its_time_limit_exits_1_and_leaves_the_previous_output_as_it_was(tmp_path, capsys, engine):
    export = write_bulk_export(tmp_path / "export", 300, seed=8)
    out = tmp_path / "flagged.csv"
    out.write_text("patient,rules\nfrom-an-earlier-run,calciphylaxis-risk\n")
    argv = [str(export.folder), "--out", str(out), "--engine", engine, "--workers", "1", "--now", NOW, "--no-progress"]
    assert main([*argv, "--time-limit", "0.001"]) == 1
    assert "screen: the run took longer than the time limit (0.001 s)" in capsys.readouterr().err
    assert out.read_text() == "patient,rules\nfrom-an-earlier-run,calciphylaxis-risk\n"
    assert main([*argv, "--time-limit", "300"]) == 0  # a limit the run keeps to changes nothing
    assert flagged_in(out) == export.flagged


def test_the_time_limit_is_one_for_the_whole_run_not_one_per_source(tmp_path, capsys, monkeypatch):
    from service.screening import distributed

    first, second = write_bulk_export(tmp_path / "a", 20, seed=1), write_bulk_export(tmp_path / "b", 20, seed=2)
    real = distributed.screen_export

    def slow(*args, **kwargs):  # each source starts 1.5 s late: alone within 2.5 s, together not
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed, "screen_export", slow)
    argv = [str(first.folder), str(second.folder), "--out", str(tmp_path / "f.csv"), "--workers", "1", "--now", NOW, "--no-progress"]
    assert main([*argv, "--time-limit", "2.5"]) == 1
    assert "the run took longer than the time limit (2.5 s)" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()


def running(engine: str, pid: int, scratch: Path) -> bool:
    """Whether a `screen` run is under way: Dask's P2P shuffle has begun, or the pool's workers are up."""
    if engine == "dask":
        return any("shuffle" in path.name for path in scratch.rglob("*"))
    import psutil

    workers = [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    return len(workers) >= 2


@pytest.mark.parametrize("engine, workers, patients", [("dask", "1", 4000), ("dask", "2", 4000), ("processes", "2", 8000)])
def test_ctrl_c_stops_a_run_with_exit_130_one_line_and_no_output_file(tmp_path, engine, workers, patients):
    export = write_bulk_export(tmp_path / "export", patients, seed=8)
    out, scratch = tmp_path / "flagged.csv", tmp_path / "tmp"
    scratch.mkdir()
    # As from a terminal: SIGINT goes to the whole process group, workers included, and is a
    # KeyboardInterrupt in `screen` even if this process ignores it.
    entry = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from service.cli import screen_main; sys.exit(screen_main())"
    process = subprocess.Popen(
        [sys.executable, "-c", entry, str(export.folder), "--out", str(out), "--engine", engine, "--workers", workers, "--now", NOW,
         "--no-progress", "--blocksize", "65536"],
        cwd=PROJECT_ROOT, env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not running(engine, process.pid, scratch):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        interrupted = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert time.monotonic() - interrupted < 20  # the run stops; it does not finish its work first
    assert stderr.rstrip().endswith(f"screen: interrupted; nothing written to {out}")
    # Neither `screen` nor a worker raised KeyboardInterrupt. (A Dask worker process busy when the
    # cluster closes may still log Dask's own "failed to communicate with scheduler" lines.)
    assert "KeyboardInterrupt" not in stderr and "service/" not in stderr and "screened" not in stdout
    assert not out.exists()


def test_a_temporary_folder_that_cannot_take_the_flagged_rows_exits_1_naming_it(tmp_path, capsys, monkeypatch):
    from service.screening.output import FlaggedRows

    export = write_bulk_export(tmp_path / "export", 200, seed=8)
    full = tmp_path / "full-disk"
    full.write_text("")  # a file where the temporary folder should be: every write in it fails
    monkeypatch.setattr("service.screening.command.FlaggedRows", lambda: FlaggedRows(spill_rows=5))
    monkeypatch.setattr("tempfile.mkdtemp", lambda prefix="": str(full))
    out = tmp_path / "flagged.csv"
    assert main([str(export.folder), "--out", str(out), "--engine", "processes", "--workers", "1", "--now", NOW, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"screen: cannot keep flagged rows in the temporary folder {full}" in err and f"nothing written to {out}" in err
    assert not out.exists()
