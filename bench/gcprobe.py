"""The service under gunicorn, optionally with gc.freeze(), counting time in the garbage collector.

Diagnostic only (`python -m bench.gc_variants http`): the service app itself is unchanged;
this module builds it exactly as `service:create_app()` does, then, when BENCH_GC says so,
applies the setting in the gunicorn master (the app is preloaded, so before the workers fork):

- BENCH_GC=none:    CPython defaults
- BENCH_GC=freeze:  gc.collect(); gc.freeze(), i.e. what a `pre_fork` hook in gunicorn.conf.py could do

GET /gc-probe answers "pid requests gc_ms handler_cpu_ms longest_pause_ms" for the worker
that serves it (?reset zeroes them); everything else goes to the service.
"""
from __future__ import annotations

import gc
import os
import time

from service import create_app

_service = create_app()
if "freeze" in os.environ.get("BENCH_GC", "none"):
    gc.collect()
    gc.freeze()

_stats = {"gc": 0.0, "n": 0, "cpu": 0.0, "max": 0.0}
_started = [0.0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        pause = time.perf_counter() - _started[0]
        _stats["gc"] += pause
        _stats["max"] = max(_stats["max"], pause)


gc.callbacks.append(_on_gc)


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/gc-probe":
        body = f"{os.getpid()} {_stats['n']} {_stats['gc'] * 1e3:.1f} {_stats['cpu'] * 1e3:.1f} {_stats['max'] * 1e3:.1f}".encode()
        if environ.get("QUERY_STRING") == "reset":
            _stats.update(gc=0.0, n=0, cpu=0.0, max=0.0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    started = time.process_time()
    try:
        return _service(environ, start_response)
    finally:
        _stats["cpu"] += time.process_time() - started
        _stats["n"] += 1


app.extensions = _service.extensions  # gunicorn.conf.py's pre_fork hook refreshes the rule store through it
