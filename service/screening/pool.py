"""Screen on the cores of one machine with a process pool (`screen --engine processes`).

Reads the whole export into the parent first (`service.harness.load_cases`), so it is bounded
by one machine's memory; `service.screening.distributed` is the way past that.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from multiprocessing import get_context

from .core import Tally, screen_cases

MAX_CHUNK = 250  # patients sent to a worker at a time

_worker_ruleset = None


def _init_worker(ruleset) -> None:
    """Each worker receives the checked rule set once, pickled, and keeps it."""
    global _worker_ruleset
    _worker_ruleset = ruleset


def _screen_chunk(cases: list, now: datetime | None, fallback: datetime) -> Tally:
    return screen_cases(_worker_ruleset, cases, now, fallback)


def screen_in_pool(ruleset, cases: list, now: datetime | None, fallback: datetime, workers: int, bar) -> tuple[Tally, int]:
    """Screen `cases` on `workers` processes; returns the merged tally and the workers used."""
    chunk = max(1, min(MAX_CHUNK, math.ceil(len(cases) / (workers * 4))))
    chunks = [cases[i : i + chunk] for i in range(0, len(cases), chunk)]
    workers = min(workers, len(chunks)) or 1
    tally = Tally()
    if workers == 1:
        for part in chunks:
            tally.merge(screen_cases(ruleset, part, now, fallback))
            bar.update(len(part))
        return tally, 1
    # spawn: a clean interpreter per worker, safe whatever threads this process runs.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(ruleset,)) as pool:
        futures = {pool.submit(_screen_chunk, part, now, fallback): len(part) for part in chunks}
        for future in as_completed(futures):
            tally.merge(future.result())
            bar.update(futures[future])
    return tally, workers
