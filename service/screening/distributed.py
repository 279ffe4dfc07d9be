"""Screen a Bulk NDJSON export on Dask (`dask.distributed`): a LocalCluster or an existing scheduler.

The work, as `dask.bag` steps, each a pure function per partition:
1. `read_text` splits every NDJSON file into blocks (`blocksize` bytes), local or any fsspec URL;
2. each block's lines are attributed to a patient (`service.screening.ndjson`); what cannot be
   is counted in a per-block `ReadReport`;
3. a task-based shuffle (`groupby`, keyed by patient id) brings each patient's lines together:
   a partition holds only the patients hashed to it, so memory per worker follows the block
   size and the partition count, not the export's size;
4. each group becomes a case and is screened with the rule set, which the client loaded and
   checked once and ships to every worker as one graph key.
The cluster is injected: `screen_export` takes a `distributed.Client`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import msgspec

from .core import ENGINE_TYPES, Tally, screen_case
from .ndjson import ReadReport, place_group, read_lines

DEFAULT_BLOCKSIZE = 32 * 2**20  # bytes of NDJSON per input partition


class ScreenError(Exception):
    """Something that stops the whole run: no input, an unreachable scheduler, the time limit."""


@dataclass
class DaskResult:
    tally: Tally
    report: ReadReport
    partitions: int
    peak_worker_rss_mb: dict[str, float]


def input_urls(source: str) -> str | list[str]:
    """A folder or fsspec URL of a Bulk export -> what `read_text` reads (its *.ndjson files)."""
    import fsspec

    if source.endswith((".ndjson", ".jsonl")) or any(c in source for c in "*?["):
        return source
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        if fs.exists(root):
            return source
        raise ScreenError(f"{source}: no such file or folder")
    files = sorted(p for p in fs.ls(root, detail=False) if p.endswith((".ndjson", ".jsonl")))
    if not files:
        raise ScreenError(f"{source}: no *.ndjson files in it")
    return [fs.unstrip_protocol(p) for p in files]


def _parse_block(lines, path: str):
    """One block's lines -> ("line", patient, how, bytes)..., then ("report", ReadReport)."""
    report = ReadReport()
    out: list[tuple] = [("line", patient, how, line) for patient, how, line in read_lines(lines, path, report, ENGINE_TYPES, numbered=False)]
    out.append(("report", report))
    return out


def _screen_groups(groups, ruleset, now: datetime | None, fallback: datetime):
    """One shuffled partition of (patient, [items]) -> [(Tally, ReadReport)]."""
    from service.harness import Case
    from service.patient.lazy import RawResource

    tally, report = Tally(), ReadReport()
    for patient, items in groups:
        lines = place_group(patient, [(how, line) for _, _, how, line in items], report)
        if lines:
            case = Case(patient, patient, [RawResource(msgspec.Raw(line)) for line in lines], None, None, "bulk export", attributed=True)
            screen_case(ruleset, case, now or fallback, tally)
    return [(tally, report)]


def build(source: str | list[str], ruleset, now: datetime | None, fallback: datetime, blocksize: int = DEFAULT_BLOCKSIZE):
    """The screening graph: (read reports bag, screened bag, partition count). Nothing runs yet."""
    import dask
    import dask.bag as db

    blocks = db.read_text(source, blocksize=blocksize, include_path=True, encoding="utf-8")
    # include_path gives (line, path) items; one path per block.
    parsed = blocks.map_partitions(lambda items: _parse_block((line for line, _ in items), next((p for _, p in items), "")))
    reports = parsed.filter(lambda item: item[0] == "report").map(lambda item: item[1])
    lines = parsed.filter(lambda item: item[0] == "line")
    partitions = max(1, blocks.npartitions)
    grouped = lines.groupby(lambda item: item[1], npartitions=partitions, shuffle="tasks")
    rules = dask.delayed(ruleset, traverse=False)
    screened = grouped.map_partitions(_screen_groups, rules, now, fallback)
    return reports, screened, partitions


def screen_export(client, source: str | list[str], ruleset, now: datetime | None, bar=None, time_limit: float | None = None,
                  blocksize: int = DEFAULT_BLOCKSIZE) -> DaskResult:
    """Run the screening graph on `client`'s cluster over `source` (see `input_urls`); `bar` advances per partition."""
    from distributed import as_completed

    fallback = datetime.now().astimezone()
    reports, screened, partitions = build(source, ruleset, now, fallback, blocksize)
    # Unoptimised, so both collections share the parse tasks instead of each fusing its own copy.
    report_parts = reports.to_delayed(optimize_graph=False)
    screen_parts = screened.to_delayed(optimize_graph=False)
    futures = client.compute(report_parts + screen_parts)
    if bar is not None:
        bar.reset(total=len(futures))
    deadline = time.monotonic() + time_limit if time_limit else None
    try:
        for _ in as_completed(futures, timeout=time_limit):
            if bar is not None:
                bar.update(1)
            if deadline is not None and time.monotonic() > deadline:
                raise ScreenError(f"the run took longer than the time limit ({time_limit:g} s)")
        results = client.gather(futures)
    except TimeoutError:
        raise ScreenError(f"the run took longer than the time limit ({time_limit:g} s)") from None
    finally:
        client.cancel(futures)
    report, tally = ReadReport(), Tally()
    for part in results[: len(report_parts)]:
        for partial in part:
            report.merge(partial)
    for part in results[len(report_parts) :]:
        for partial_tally, partial_report in part:
            tally.merge(partial_tally)
            report.merge(partial_report)
    for kind, count in tally.invalid.items():
        report.skipped[f"invalid {kind}"] += count
    return DaskResult(tally, report, partitions, peak_worker_memory(client))


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_worker_memory(client) -> dict[str, float]:
    """Each worker process's peak resident memory so far, in MB."""
    try:
        return client.run(_peak_rss_mb)
    except Exception:  # noqa: BLE001 - a figure for the summary, never a reason to fail the run
        return {}


def connect(address: str | None, workers: int, in_process: bool = False, timeout: float = 30.0, memory_limit: str = "1GiB"):
    """A Client: to `address` when given, else to a LocalCluster of `workers` single-threaded processes on loopback.

    `in_process` runs the LocalCluster's workers as threads of this process (needed for
    `memory://` input, whose files exist only in this process). `memory_limit` is per worker:
    past 60% of it a worker spills held partitions to disk, past 80% it pauses. The task
    shuffle holds every split of the export somewhere in the cluster until the groups are
    complete, so spilling, not the partition size alone, is what keeps a worker's memory
    from growing with the export. A worker is never killed for memory: a slow run beats a lost one.
    """
    import dask
    from distributed import Client, LocalCluster

    if address:
        try:
            return Client(address, timeout=timeout), None
        except (OSError, TimeoutError) as exc:
            raise ScreenError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({exc})") from None
    # Worker processes talk over TCP on loopback only; thread workers use in-process comms, no socket at all.
    where = {} if in_process else {"host": "127.0.0.1"}
    with dask.config.set({"distributed.worker.memory.terminate": False}):
        cluster = LocalCluster(
            # The scheduler always serves HTTP (health, metrics); a free loopback port, never a fixed one.
            n_workers=workers, threads_per_worker=1, processes=not in_process, dashboard_address="127.0.0.1:0",
            silence_logs=40, memory_limit=memory_limit, **where,
        )
    return Client(cluster, timeout=timeout), cluster
