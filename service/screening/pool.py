"""Screen on the cores of one machine with a process pool (`screen --engine processes`).

Reads the whole export into the parent first (`service.harness.load_cases`), so it is bounded
by one machine's memory; `service.screening.distributed` is the way past that.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from multiprocessing import get_context

from .core import Tally, screen_cases
from .interrupt import ctrl_c_held

MAX_CHUNK = 250  # patients sent to a worker at a time

_worker_ruleset = None
_worker_stop = None


def _init_worker(ruleset, stop) -> None:
    """Each worker receives the checked rule set once, pickled, and keeps it, and the run's stop event."""
    global _worker_ruleset, _worker_stop
    _worker_ruleset, _worker_stop = ruleset, stop


def _screen_chunk(cases: list, now: datetime | None, fallback: datetime) -> Tally:
    if _worker_stop.is_set():  # the run was stopped: a chunk already queued is dropped, not screened
        return Tally()
    return screen_cases(_worker_ruleset, cases, now, fallback)


def screen_in_pool(ruleset, cases: list, now: datetime | None, fallback: datetime, workers: int, bar,
                   deadline: float | None = None) -> tuple[Tally, int]:
    """Screen `cases` on `workers` processes; returns the merged tally and the workers used.

    Past `deadline` (`time.monotonic()`) it raises TimeoutError. Then, or on Ctrl-C, chunks not yet
    started are cancelled or dropped, not screened.
    """
    chunk = max(1, min(MAX_CHUNK, math.ceil(len(cases) / (workers * 4))))
    chunks = [cases[i : i + chunk] for i in range(0, len(cases), chunk)]
    workers = min(workers, len(chunks)) or 1
    tally = Tally()
    if workers == 1:
        for part in chunks:
            tally.merge(screen_cases(ruleset, part, now, fallback))
            bar.update(len(part))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
        return tally, 1
    # spawn: a clean interpreter per worker, safe whatever threads this process runs.
    context = get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(ruleset, stop)) as pool:
        try:
            with ctrl_c_held():  # the workers start at the first submit, all of them
                futures = {pool.submit(_screen_chunk, part, now, fallback): len(part) for part in chunks}
            for future in as_completed(futures, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
                tally.merge(future.result())
                bar.update(futures[future])
        except BaseException:
            # Past the deadline, or Ctrl-C: stop now. Chunks not yet queued are cancelled; those a
            # worker already holds come back empty, so the executor is done within one chunk, and
            # waiting for it lets a worker still starting finish its start-up cleanly. (Terminating
            # the workers instead can cut the executor's queue off mid-write, and it then prints an
            # OSError traceback of its own.)
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return tally, workers
