"""`screen SOURCE --out FILE`: population screening of a FHIR Bulk Data export.

Also `replay PATH --screen FILE` (an alias). The rule set is loaded and checked once here,
then shipped to the workers; only flagged patients are written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from service.console import load_rules, parse_when

from .output import FlaggedRows, SpillError, Summary, output_format, write_rows

EPILOG = """\
engines:
  dask (default)   dask.distributed: an embedded LocalCluster of --workers processes on
                   127.0.0.1 (one worker: a thread of this process), or the cluster at
                   --scheduler / DASK_SCHEDULER_ADDRESS.
                   SOURCE is a folder or any fsspec URL (file://, memory://, s3://...).
  processes        today's single-machine process pool; SOURCE is local files or folders.

exit status: 0 every patient screened; 1 a patient could not be evaluated, a broken rule
set, a Bulk Data export that failed, --time-limit passed, or no room for the flagged rows in
the temporary folder; 2 bad arguments, unreadable input, or no cluster; 130 Ctrl-C. --out is
written whole or not at all: a run that stops leaves the previous file as it was.

examples:
  screen export/ --out flagged.csv --now 2026-11-01T12:00:00Z
  screen file:///data/export/ --out flagged.parquet --scheduler tcp://127.0.0.1:8786
  screen export/ --out flagged.ndjson --engine processes --workers 8
  screen --from-fhir http://127.0.0.1:8090/fhir --group renal-unit --out flagged.csv \\
         --smart-client-id screening --smart-key client.pem
"""


def parser(prog: str = "screen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Screen every patient of a FHIR Bulk Data export (NDJSON) with the rules; write only the flagged ones.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="a Bulk export folder, NDJSON file or fsspec URL (not with --from-fhir)")
    p.add_argument("--out", required=True, metavar="FILE", help="flagged patients: FILE.csv, FILE.ndjson or FILE.parquet (a path or fsspec URL)")
    p.add_argument("--rules", help="rules folder (default: CDS_RULES_DIR or ./rules)")
    p.add_argument("--now", metavar="ISO", help="evaluate at this time (default: now)")
    p.add_argument("--summary", metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal)")
    run = p.add_argument_group("where it runs")
    run.add_argument("--engine", choices=("dask", "processes"), default="dask", help="dask.distributed (default) or a local process pool")
    run.add_argument("--workers", type=int, metavar="N", help="processes of the embedded LocalCluster or pool (default: the CPU count; 1 runs in this process)")
    run.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://HOST:8786 (default: DASK_SCHEDULER_ADDRESS, else a LocalCluster)")
    run.add_argument("--blocksize", type=int, default=None, metavar="BYTES", help="NDJSON bytes per Dask partition (default 8 MiB): bounds memory per worker")
    run.add_argument("--worker-memory", default="1GiB", metavar="SIZE", help="memory per LocalCluster worker; past 60%% of it a worker spills to disk (default 1GiB)")
    run.add_argument("--time-limit", type=float, metavar="SECONDS", help="give up (exit 1) if screening takes longer")
    run.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS", help="give up (exit 2) on a scheduler not reached in this time (default 30)")
    bulk = p.add_argument_group("from a FHIR server (Bulk Data $export)")
    bulk.add_argument("--from-fhir", metavar="BASE", help="export from this FHIR server first (Patient/$export, or Group/ID/$export with --group)")
    bulk.add_argument("--group", metavar="ID", help="export only this Group's patients")
    bulk.add_argument("--download-dir", metavar="DIR", help="where the export's files go (default: a folder beside --out); a rerun resumes there")
    bulk.add_argument("--token", metavar="TOKEN", help="a static bearer token (default: CDS_BULK_TOKEN)")
    bulk.add_argument("--smart-client-id", metavar="ID", help="SMART Backend Services: the registered client id")
    bulk.add_argument("--smart-key", metavar="PEM", help="SMART Backend Services: the client's private key (RSA -> RS384, EC P-384 -> ES384)")
    bulk.add_argument("--smart-kid", metavar="KID", help="the key id registered with the server (default: the key's RFC 7638 thumbprint)")
    bulk.add_argument("--smart-scope", default="system/Patient.read system/Observation.read system/Condition.read system/Procedure.read",
                      metavar="SCOPE", help="scopes asked for (default: read of the exported types)")
    bulk.add_argument("--export-timeout", type=float, default=3600.0, metavar="SECONDS", help="give up on an export not ready after this long (default 3600)")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    if not args.sources and not args.from_fhir:
        p.error("give a SOURCE (an export folder or URL) or --from-fhir BASE")
    if args.sources and args.from_fhir:
        p.error("--from-fhir downloads its own export: give no SOURCE with it")
    if args.group and not args.from_fhir:
        p.error("--group selects what --from-fhir exports: use it with --from-fhir")
    if output_format(args.out) is None:
        p.error(f"--out {args.out}: the file name must end in .csv, .ndjson or .parquet")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if args.blocksize is not None and args.blocksize < 1024:
        p.error("--blocksize must be at least 1024 bytes")
    if args.time_limit is not None and args.time_limit <= 0:
        p.error("--time-limit must be positive")
    if args.connect_timeout <= 0:
        p.error("--connect-timeout must be positive")
    if args.export_timeout <= 0:
        p.error("--export-timeout must be positive")
    if args.scheduler and args.engine != "dask":
        p.error("--scheduler is a Dask cluster: it does not combine with --engine processes")
    if args.scheduler and args.worker_memory != "1GiB":
        p.error("--worker-memory sizes the embedded LocalCluster's workers; a cluster at --scheduler has its own")
    if args.scheduler and args.workers:
        p.error("--workers sizes the embedded LocalCluster; a cluster at --scheduler has its own workers")
    if bool(args.smart_client_id) != bool(args.smart_key):
        p.error("--smart-client-id and --smart-key go together")
    if args.token and args.smart_key:
        p.error("give either --token or SMART Backend Services (--smart-client-id, --smart-key), not both")
    if (args.token or args.smart_key or args.download_dir) and not args.from_fhir:
        p.error("--token, --smart-* and --download-dir are for --from-fhir")


def _progress(args, what: str, unit: str):
    from tqdm import tqdm

    disabled = args.no_progress or not sys.stderr.isatty()
    return tqdm(total=None, desc=what, unit=unit, file=sys.stderr, disable=disabled, leave=False)


def main(argv: list[str] | None = None, prog: str = "screen") -> int:
    from service.config import from_environment

    p = parser(prog)
    args = p.parse_args(argv)
    _check(p, args)
    try:
        now = parse_when(args.now)
    except ValueError as exc:
        p.error(str(exc))
    ruleset = load_rules(args.rules or from_environment()["RULES_DIR"])
    if ruleset is None:
        return 1

    sources = list(args.sources)
    export_failed = False
    if args.from_fhir:
        from .bulk_export import run_export_command

        code, folder = run_export_command(args, ruleset, _progress)
        if folder is None:
            return code
        export_failed = code != 0
        sources = [str(folder)]

    from .core import value_columns

    try:
        with FlaggedRows() as flagged:
            started = time.perf_counter()
            if args.engine == "processes":
                result = _run_pool(args, ruleset, sources, now, flagged)
            else:
                result = _run_dask(args, ruleset, sources, now, flagged)
            if isinstance(result, int):
                return result
            tally, report, engine, workers, extra = result
            wall = time.perf_counter() - started
            try:
                write_rows(args.out, flagged.in_order(), value_columns(ruleset))
            except OSError as exc:
                print(f"{prog}: cannot write {args.out}: {exc}", file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    except SpillError as exc:
        print(f"{prog}: {exc}; nothing written to {args.out}", file=sys.stderr)
        return 1
    summary = Summary(
        engine=engine, workers=workers, fingerprint=ruleset.fingerprint, screened=tally.screened,
        flagged=flagged.count, by_rule=flagged.per_rule(ruleset), read=report.to_json(),
        errors=len(tally.errors), wall_seconds=wall, output=args.out, source=" ".join(args.sources) or args.from_fhir, extra=extra,
    )
    summary.print()
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    if tally.errors:
        print(f"{len(tally.errors)} patient(s) could not be evaluated:", file=sys.stderr)
        for failure in tally.errors[:20]:
            print(f"  {failure['patient']}: {failure['error']}", file=sys.stderr)
        return 1
    return 1 if export_failed else 0


def _run_pool(args, ruleset, sources: list[str], now: datetime | None, flagged: FlaggedRows):
    from service.harness import InputError, load_cases

    from .core import ENGINE_TYPES, time_limit_error
    from .ndjson import ReadReport
    from .pool import screen_in_pool

    # The time limit counts from here, reading the export included, as a Dask run's does.
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    local = [s for s in sources if "://" not in s]
    if len(local) != len(sources):
        print("screen: --engine processes reads local files only; use --engine dask for URLs", file=sys.stderr)
        return 2
    report = ReadReport()
    try:
        cases = list(load_cases(local, report, lenient=True, keep_types=ENGINE_TYPES))
    except InputError as exc:
        print(f"screen: {exc}", file=sys.stderr)
        return 2
    if not cases and not report.lines:
        print(f"screen: no Bundles, hook requests or NDJSON resources in {' '.join(sources)}", file=sys.stderr)
        return 2
    workers = args.workers or os.cpu_count() or 1
    bar = _progress(args, "screening", "patient")
    bar.reset(total=len(cases))
    try:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        tally, used = screen_in_pool(ruleset, cases, now, datetime.now().astimezone(), workers, bar, deadline)
    except TimeoutError:
        print(f"screen: {time_limit_error(args.time_limit)}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    for kind, count in tally.invalid.items():
        report.skipped[f"invalid {kind}"] += count
    flagged.take(tally)
    return tally, report, "processes", used, {}


def _run_dask(args, ruleset, sources: list[str], now: datetime | None, flagged: FlaggedRows):
    from .distributed import DEFAULT_BLOCKSIZE, ScreenError, connect, input_urls, screen_export

    address = args.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    workers = args.workers or os.cpu_count() or 1
    # One worker runs as a thread of this process, as the pool's single worker does: a process of
    # its own would add its start-up, a nanny and TCP to the scheduler, 10-30% more CPU for no
    # parallelism (docs/performance.md). memory:// files live in this process: its workers must
    # be threads here to see them.
    in_process = not address and (workers == 1 or any(s.startswith("memory://") for s in sources))
    try:  # before starting a cluster: a wrong path should not cost its start-up
        urls = [input_urls(source) for source in sources]
    except (ScreenError, OSError) as exc:
        print(f"screen: {exc}", file=sys.stderr)
        return 2
    client = cluster = None
    bar = _progress(args, "screening", "partition")
    try:
        started = time.perf_counter()
        client, cluster = connect(address, workers, in_process, args.connect_timeout, args.worker_memory)
        connected = time.perf_counter() - started
        from .core import Tally
        from .ndjson import ReadReport

        tally, report, peaks, partitions = Tally(), ReadReport(), {}, 0
        deadline = time.monotonic() + args.time_limit if args.time_limit else None  # one limit for all the sources
        for source in urls:
            result = screen_export(client, source, ruleset, now, bar, args.time_limit, args.blocksize or DEFAULT_BLOCKSIZE, flagged,
                                   deadline)
            tally.merge(result.tally)
            report.merge(result.report)
            partitions += result.partitions
            peaks = result.peak_worker_rss_mb
        used = len(client.scheduler_info(n_workers=-1)["workers"]) if _accepts_n_workers(client) else len(client.scheduler_info()["workers"])
    except ScreenError as exc:
        print(f"screen: {exc}", file=sys.stderr)
        return 2 if "time limit" not in str(exc) else 1
    except FileNotFoundError as exc:
        print(f"screen: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    engine = f"dask {address}" if address else ("dask LocalCluster (threads)" if in_process else "dask LocalCluster")
    # Wall time includes starting a LocalCluster; this says how much of it that was.
    extra = {"partitions": partitions, "peak_worker_rss_mb": peaks, "cluster_start_seconds": round(connected, 2)}
    return tally, report, engine, used, extra


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters
