"""Diagnostic: how much of a hook request is CPython's cyclic garbage collector, and what helps.

    python -m bench.gc_variants            # all variants, each in a fresh process
    python -m bench.gc_variants freeze     # one variant
    python -m bench.gc_variants http       # the service under gunicorn, without and with gc.freeze()

Each variant runs the in-process endpoint path (Flask test client) at 100, 1,000 and 5,000
Observations and reports CPU time per request (time.process_time, so less sensitive to
other processes than wall time) and the time spent inside the collector (gc.callbacks).
The variants are applied from outside, to the same service code:

- none:             CPython defaults (thresholds 700/10/10)
- freeze:           gc.freeze() after the app is built (what a gunicorn post_fork/when_ready hook could do)
- threshold:        gc.set_threshold(50_000, 20, 100)
- freeze+threshold: both
- nogc-parse:       the collector paused around orjson.loads of the request body only
"""
from __future__ import annotations

import gc
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

VARIANTS = ("none", "freeze", "threshold", "freeze+threshold", "nogc-parse")
PLAN = ((100, 100), (1000, 30), (5000, 8))


def run_variant(variant: str) -> str:
    import orjson

    from . import data, inprocess

    app = inprocess.make_app(Path(tempfile.mkdtemp(prefix="calcinosis-gc-")))
    client = app.test_client()
    for n in (10, 100):  # import everything lazily loaded before freezing
        client.post(inprocess.ENDPOINT, data=data.body(n), content_type="application/json")
    if "freeze" in variant:
        gc.collect()
        gc.freeze()
    if "threshold" in variant:
        gc.set_threshold(50_000, 20, 100)
    if variant == "nogc-parse":
        import service.cds_hooks.routes as routes

        def loads(raw):
            gc.disable()
            try:
                return orjson.loads(raw)
            finally:
                gc.enable()

        routes.orjson = types.SimpleNamespace(loads=loads, dumps=orjson.dumps, JSONDecodeError=orjson.JSONDecodeError)

    in_gc = [0.0]
    pauses: list[float] = []
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pause = time.perf_counter() - started[0]
            in_gc[0] += pause
            pauses.append(pause)

    gc.callbacks.append(callback)
    parts = []
    for n, runs in PLAN:
        body = data.body(n)
        for _ in range(2):
            client.post(inprocess.ENDPOINT, data=body, content_type="application/json")
        in_gc[0] = 0.0
        pauses.clear()
        cpu: list[float] = []
        for _ in range(runs):
            t = time.process_time()
            client.post(inprocess.ENDPOINT, data=body, content_type="application/json")
            cpu.append((time.process_time() - t) * 1000)
        cpu.sort()
        parts.append(
            f"{n:>5} Obs: CPU p50 {cpu[len(cpu) // 2]:7.1f} max {cpu[-1]:7.1f} ms, GC {in_gc[0] / runs * 1000:6.1f} ms/req "
            f"(longest pause {max(pauses, default=0) * 1000:5.1f} ms)"
        )
    return f"{variant:<17} " + " | ".join(parts)


def http_variants(modes=("none", "freeze", "none", "freeze"), seconds: float = 8, connections: int = 4) -> None:
    """Run bench.gcprobe under the repo's gunicorn.conf.py with each BENCH_GC mode; print per-request figures."""
    import os
    import urllib.request

    from . import data, load, machine

    def probe(port: int, reset: bool = False) -> dict:
        seen: dict = {}
        for _ in range(16):  # each call reaches one of the two sync workers
            url = f"http://127.0.0.1:{port}/gc-probe" + ("?reset" if reset else "")
            pid, n, gc_ms, cpu_ms, longest = urllib.request.urlopen(url, timeout=10).read().decode().split()
            seen.setdefault(pid, (int(n), float(gc_ms), float(cpu_ms), float(longest)))
        return seen

    for mode in modes:
        os.environ["BENCH_GC"] = mode
        with tempfile.TemporaryDirectory(prefix="calcinosis-gc-") as tmp:
            workdir = Path(tmp)
            with load.Gunicorn("bench.gcprobe:app", workdir, f"gc-{mode}") as server:
                for n in (100, 1000):
                    body = workdir / f"request-{n}.json"
                    body.write_bytes(data.body(n))
                    load.drive(server, body, 2, connections, "wrk" if load.have_wrk() else "python")
                    probe(server.port, reset=True)
                    with machine.CpuMeter([server.proc.pid, *server.workers()]) as meter:
                        r = load.drive(server, body, seconds, connections, "wrk" if load.have_wrk() else "python")
                    seen = probe(server.port)
                    served = sum(v[0] for v in seen.values()) or 1
                    print(
                        f"{mode:<7} {n:>5} Obs: {r.rps:6.1f} req/s  p50 {r.p50_ms:6.1f}  p99 {r.p99_ms:6.1f} ms | "
                        f"worker CPU {meter.usage.pids_cpu_seconds * 1000 / max(r.requests, 1):5.1f} ms/req, "
                        f"GC {sum(v[1] for v in seen.values()) / served:5.1f} ms/req, longest GC pause {max(v[3] for v in seen.values()):5.1f} ms "
                        f"| RSS {[m.rss_mb for m in server.memory()]} MB | {meter.usage.note()}",
                        flush=True,
                    )
    os.environ.pop("BENCH_GC", None)


def main(argv: list[str]) -> int:
    if argv == ["http"]:
        http_variants()
        return 0
    if argv:
        print(run_variant(argv[0]), flush=True)
        return 0
    from . import machine

    print(f"CPU per request (process_time) and time inside the collector; load average {machine.loadavg()}")
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, "-m", "bench.gc_variants", variant], capture_output=True, text=True, timeout=600, check=False)
        print(done.stdout.strip() or f"{variant}: failed\n{done.stderr[-2000:]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
