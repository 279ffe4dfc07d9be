"""Screen a Bulk NDJSON export on Dask (`dask.distributed`): a LocalCluster or an existing scheduler.

The work, each step a pure function per partition:
1. `dask.bytes.read_bytes` splits every NDJSON file into blocks of whole lines (`blocksize`
   bytes), local or any fsspec URL;
2. each block's lines are attributed to a patient (`service.screening.ndjson`) and become a
   pandas frame (patient, how, line, order), the line kept as the bytes it was read as; what
   cannot be attributed or read (not JSON, not UTF-8) is counted in the block's `ReadReport`,
   which travels beside the frame, not through the shuffle;
3. Dask's peer-to-peer shuffle (`DataFrame.shuffle(on="patient", shuffle_method="p2p")`) brings
   each patient's lines into one output partition. Workers send each other shards as they are
   cut and write the shards they receive to their local directory, so no process holds the
   export: a worker's memory follows the block size and the P2P buffers, not N;
4. each output partition's patients become cases, screened with the rule set, which the client
   loaded and checked once and scattered to every worker before the graph: a worker then screens
   each partition as soon as it has unpacked it, and holds only a few unpacked at a time.
The cluster is injected: `screen_export` takes a `distributed.Client`.

The P2P shuffle needs the distributed scheduler (any `Client` here), pandas and pyarrow on
every worker, and room in each worker's local directory (`--local-directory` of `dask worker`,
else the system's temporary folder) for its share of the export. It runs on thread workers too,
so `memory://` input (an in-process LocalCluster) takes the same path: no fallback is needed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from .core import ENGINE_TYPES, ScreenError, Tally, screen_case, time_limit_error
from .ndjson import ReadReport, read_lines

# Bytes of NDJSON per input partition. Parsing a block and cutting it into shards costs several
# times its size for a moment; at 32 MiB those peaks also left a worker's heap fragmented and
# growing with N (docs/performance.md), at 8 MiB they do not.
DEFAULT_BLOCKSIZE = 8 * 2**20
COLUMNS = ("patient", "how", "line", "order")
# The LocalCluster's P2P buffers, per worker. Dask's defaults (up to 1 GiB of outgoing shards)
# alone would allow a worker past the 1 GB target; a few blocks' worth keeps the shuffle streaming.
P2P_COMM_BUFFER = "32MiB"
P2P_STORAGE_BUFFER = "32MiB"


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


def _line_dtype():
    import pandas as pd
    import pyarrow as pa

    # Arrow binary: the shuffle moves the bytes as read, with no decoding to text and back.
    return pd.ArrowDtype(pa.binary())


def _empty_frame():
    import pandas as pd

    columns = {name: pd.Series([], dtype="str") for name in COLUMNS[:2]}
    return pd.DataFrame({**columns, "line": pd.Series([], dtype=_line_dtype()), "order": pd.Series([], dtype="int64")})


def _parse_block(data: bytes, path: str, block: int):
    """Block number `block` (whole lines of the file at `path`) -> (frame of attributed lines, ReadReport of the rest).

    `order` is the line's place in the export (block, then line), so that a patient's resources
    are screened in the export's order whatever order the shuffle delivered them in.
    """
    import pandas as pd

    report = ReadReport()
    patients, hows, lines = [], [], []
    for patient, how, line in read_lines(data.split(b"\n"), path, report, ENGINE_TYPES, numbered=False):
        patients.append(patient)
        hows.append(how)
        lines.append(line)
    if not lines:
        return _empty_frame(), report
    frame = pd.DataFrame({"patient": patients, "how": hows}, dtype="str")
    frame["line"] = pd.Series(lines, dtype=_line_dtype())
    frame["order"] = pd.Series(range(len(lines)), dtype="int64") + (block << 32)
    return frame, report


def _screen_frame(frame, ruleset, now: datetime | None, fallback: datetime):
    """One shuffled partition (every line of the patients hashed to it) -> (Tally, ReadReport)."""
    from service.harness import bulk_case

    frame = frame.sort_values("order")
    groups: dict[str, list[tuple[str, bytes]]] = {}
    for patient, how, line in zip(frame["patient"].tolist(), frame["how"].tolist(), frame["line"].tolist()):
        groups.setdefault(patient, []).append((how, line))
    tally, report = Tally(), ReadReport()
    for patient, items in groups.items():
        # Decoded whole (orjson), as the process pool does: ~10% less CPU per patient than lazy
        # msgspec decoding of what the rules read (docs/performance.md).
        case = bulk_case(patient, items, report)
        if case is not None:
            screen_case(ruleset, case, now or fallback, tally)
    return tally, report


def build(source: str | list[str], rules, now: datetime | None, fallback: datetime, blocksize: int = DEFAULT_BLOCKSIZE):
    """The screening graph: ([ReadReport per block], [(Tally, ReadReport) per output partition]), as delayed objects.

    `rules` is the rule set as a Future already held by every worker (`Client.scatter`).
    """
    import dask
    import dask.dataframe as dd
    from dask.bytes import read_bytes

    _, blocks, paths = read_bytes(source, delimiter=b"\n", blocksize=blocksize, sample=False, include_path=True)
    parse = dask.delayed(_parse_block, nout=2, pure=True)
    located = [(block, path) for path, file_blocks in zip(paths, blocks) for block in file_blocks]
    parsed = [parse(block, path, number) for number, (block, path) in enumerate(located)]
    if not parsed:  # only empty files
        parsed = [parse(b"", "", 0)]
    frames = dd.from_delayed([frame for frame, _ in parsed], meta=_empty_frame(), verify_meta=False)
    partitions = len(parsed)
    shuffled = frames.shuffle(on="patient", npartitions=partitions, shuffle_method="p2p")
    screen = dask.delayed(_screen_frame, pure=True)
    screened = [screen(part, rules, now, fallback) for part in shuffled.to_delayed()]
    return [report for _, report in parsed], screened


def screen_export(client, source: str | list[str], ruleset, now: datetime | None, bar=None, time_limit: float | None = None,
                  blocksize: int = DEFAULT_BLOCKSIZE, rows=None, deadline: float | None = None) -> DaskResult:
    """Run the screening graph on `client`'s cluster over `source` (see `input_urls`); `bar` advances per partition.

    `rows` (a `FlaggedRows`) takes each partition's flagged rows as it finishes, so this process
    does not hold them all; without it they are in the result's tally. The run stops with
    ScreenError at `deadline` (`time.monotonic()`, shared by a run over several sources), else
    `time_limit` seconds from now.
    """
    from distributed import as_completed

    fallback = datetime.now().astimezone()
    # The rule set goes to every worker before the graph does. As a task of the graph it would be
    # a root task, which the scheduler holds back while a worker is busy: after the shuffle's
    # barrier it then waited for every partition to be unpacked, and the worker held them all.
    rules = client.scatter(ruleset, broadcast=True, hash=False)
    report_parts, screen_parts = build(source, rules, now, fallback, blocksize)
    futures = client.compute(report_parts + screen_parts)
    position = {future.key: i for i, future in enumerate(futures)}
    results: list = [None] * len(futures)
    if bar is not None:
        bar.reset(total=len(futures))
    if deadline is None and time_limit:
        deadline = time.monotonic() + time_limit
    # as_completed holds each future only until it yields it with its result: the client takes
    # every result as soon as it is ready, so flagged rows do not pile up in worker memory.
    pending = as_completed(futures, timeout=None if deadline is None else max(0.001, deadline - time.monotonic()), with_results=True)
    del futures
    try:
        for future, result in pending:
            place = position[future.key]
            if rows is not None and place >= len(report_parts):  # a screened partition: (Tally, ReadReport)
                rows.take(result[0])
            results[place] = result
            if bar is not None:
                bar.update(1)
            if deadline is not None and time.monotonic() > deadline:
                raise time_limit_error(time_limit)
    except TimeoutError:
        raise time_limit_error(time_limit) from None
    finally:
        left = list(pending.futures)
        if left:
            client.cancel(left)
    report, tally = ReadReport(), Tally()
    for partial in results[: len(report_parts)]:
        report.merge(partial)
    for partial_tally, partial_report in results[len(report_parts) :]:
        tally.merge(partial_tally)
        report.merge(partial_report)
    for kind, count in tally.invalid.items():
        report.skipped[f"invalid {kind}"] += count
    return DaskResult(tally, report, len(report_parts), peak_worker_memory(client))


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

    `in_process` runs the LocalCluster's workers as threads of this process: for `memory://`
    input, whose files exist only in this process, and for a single worker, which gains nothing
    from a process of its own. `memory_limit` is per worker (for a thread worker, this process's):
    past 60% of it a worker spills held results to disk. The P2P shuffle keeps its shards on
    disk itself, outside that budget, and its buffers are sized here so that a worker stays well
    under it. A worker is never paused or killed for memory: a slow run beats a stuck or lost one.
    A cluster at `address` keeps its own configuration (P2P buffers, memory limits, profiler).
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
    settings = {
        "distributed.worker.memory.terminate": False,
        "distributed.p2p.comm.buffer": P2P_COMM_BUFFER,
        "distributed.p2p.storage.buffer": P2P_STORAGE_BUFFER,
        # One block in flight per worker thread (Dask's default, 1.1, reads a second one ahead).
        "distributed.scheduler.worker-saturation": 1.0,
        # A paused worker runs no task, so a P2P transfer whose memory is not spillable would wait forever.
        "distributed.worker.memory.pause": False,
        # The statistical profiler keeps a profile per second of the run (up to 1,000): memory that
        # grows with N, for a dashboard nobody opens on the embedded cluster.
        "distributed.worker.profile.enabled": False,
        # pyarrow's default pool (mimalloc) keeps what P2P's tables freed; the system one returns it.
        "distributed.nanny.pre-spawn-environ.ARROW_DEFAULT_MEMORY_POOL": "system",
        # Housekeeping timers of the scheduler (in this process), each nanny and each worker. At
        # Dask's defaults (an event-loop tick every 20 ms, memory read every 100 ms) an idle
        # 1-worker cluster used 7% of a core; at these, 1.7%. A blocked event loop is still
        # noticed within the tick, and a worker's memory read every second.
        "distributed.admin.tick.interval": "200ms",
        "distributed.worker.memory.monitor-interval": "1s",
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.deploy.cluster-repr-interval": "5s",
    }
    if not in_process:  # Ctrl-C is for `screen` alone, which cancels the run and closes the cluster
        settings["distributed.worker.preload"] = ["service.screening.worker_setup"]
    with dask.config.set(settings):  # worker processes get this configuration from their nanny
        cluster = LocalCluster(
            # The scheduler always serves HTTP (health, metrics); a free loopback port, never a fixed one.
            n_workers=workers, threads_per_worker=1, processes=not in_process, dashboard_address="127.0.0.1:0",
            silence_logs=40, memory_limit=memory_limit, **where,
        )
    return Client(cluster, timeout=timeout), cluster
