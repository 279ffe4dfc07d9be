"""`python -m bench.screening`: population screening throughput and memory, process pool beside Dask.

Writes a synthetic Bulk export of N patients (tests/synthetic.py, same profiles as the
2,000-patient test) into a temporary folder, which is deleted afterwards, then runs
`screen` on it once per configuration, each in its own process:

    processes x1, processes x2      today's process pool (`--engine processes`)
    dask x1, dask x2                an embedded LocalCluster of 1 and 2 worker processes

and prints patients/s (with and without the cluster's start-up), patients per CPU-second (every
process of the run counted: throughput per core that does not depend on how many cores the
configuration managed to use), the peak resident memory of
the largest process (the pool's parent holds the whole export) and of each Dask worker, and
whether every configuration flagged exactly the patients the generator says it must.

    python -m bench.screening --patients 100000
    python -m bench.screening --patients 20000 --only dask --workers 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.synthetic import write_bulk_export

NOW = "2026-11-01T12:00:00Z"
CONFIGS = (("processes", 1), ("processes", 2), ("dask", 1), ("dask", 2))


def run_one(export: Path, out_dir: Path, engine: str, workers: int, timeout: float) -> dict:
    out = out_dir / f"{engine}-{workers}.csv"
    summary = out_dir / f"{engine}-{workers}.json"
    screen = Path(sys.executable).with_name("screen")
    argv = [str(screen), str(export), "--out", str(out), "--engine", engine, "--workers", str(workers),
            "--now", NOW, "--no-progress", "--summary", str(summary)]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:  # wait4 gives this child's own peak RSS; poll so the run stays bounded in time
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            os.waitpid(process.pid, 0)
            raise SystemExit(f"{engine} x{workers}: no result within {timeout:g} s")
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{engine} x{workers}: exit {process.returncode}\n{stderr[-2000:]}")
    body = json.loads(summary.read_text())
    with out.open(encoding="utf-8", newline="") as handle:
        flagged = {r["patient"]: tuple(r["rules"].split()) for r in csv.DictReader(handle)}
    start_up = body.get("cluster_start_seconds", 0.0)
    screened = body["patients_screened"]
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "engine": engine, "workers": workers, "patients": screened, "process_seconds": round(elapsed, 1),
        "wall_seconds": body["wall_seconds"], "cluster_start_seconds": start_up,
        "patients_per_second": body["patients_per_second"],
        "patients_per_second_after_start": round(screened / max(1e-9, body["wall_seconds"] - start_up), 1),
        "largest_process_peak_mb": round(usage.ru_maxrss / 1024, 1),
        # wait4 counts the child's CPU time and that of every descendant it waited for (pool
        # workers, Dask's nannies and their workers, the scheduler's thread): the whole run's cost.
        "cpu_seconds": round(cpu, 1),
        "patients_per_cpu_second": round(screened / max(1e-9, cpu), 1),
        "worker_peak_mb": body.get("peak_worker_rss_mb") or {},
        "flagged": flagged,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.screening", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--only", choices=("processes", "dask"))
    parser.add_argument("--workers", type=int, action="append", choices=(1, 2), help="only these worker counts (repeatable; default 1 and 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per configuration, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="screen-bench-") as tmp:
        folder = Path(tmp) / "export"
        started = time.perf_counter()
        export = write_bulk_export(folder, args.patients, seed=7)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{args.patients:,} patients, {size / 2**20:,.0f} MB of NDJSON, written in {time.perf_counter() - started:.0f} s; "
              f"{len(export.flagged):,} must be flagged; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
        results = []
        for engine, workers in CONFIGS:
            if (args.only and engine != args.only) or (args.workers and workers not in args.workers):
                continue
            result = run_one(folder, Path(tmp), engine, workers, args.timeout)
            result["same_as_expected"] = result.pop("flagged") == export.flagged
            results.append(result)
            workers_mb = ", ".join(f"{mb:.0f}" for mb in sorted(result["worker_peak_mb"].values())) or "-"
            print(f"{engine:>9} x{workers}: {result['patients_per_second']:>7,.0f} patients/s "
                  f"({result['patients_per_second_after_start']:,.0f} after {result['cluster_start_seconds']:.1f} s start-up), "
                  f"wall {result['wall_seconds']:.0f} s, {result['patients_per_cpu_second']:,.0f} patients per CPU-second "
                  f"({result['cpu_seconds']:,.0f} CPU-s), largest process {result['largest_process_peak_mb']:,.0f} MB, "
                  f"workers {workers_mb} MB, flagged set {'identical' if result['same_as_expected'] else 'DIFFERENT'}; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"patients": args.patients, "results": results}, indent=2))
    return 0 if all(r["same_as_expected"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
