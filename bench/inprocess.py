"""In-process timings: one hook request through the Flask test client, and `hooks.answer` alone.

The test client runs the same code as the HTTP endpoint (routing, orjson parsing,
`hooks.answer`, card rendering, orjson serialisation, the JSON request log) without a
socket. `answer()` is timed on an already-parsed body, to separate the engine from parsing.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import orjson

from . import data

ENDPOINT = f"/cds-services/{data.SERVICE_ID}"


@dataclass
class Timing:
    n: int
    runs: int
    body_bytes: int
    endpoint_ms: list[float] = field(default_factory=list)
    endpoint_cpu_ms: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    parse_ms: list[float] = field(default_factory=list)
    rules_fired: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "observations": self.n,
            "runs": self.runs,
            "body_kb": round(self.body_bytes / 1024, 1),
            "endpoint_p50_ms": percentile(self.endpoint_ms, 50),
            "endpoint_p99_ms": percentile(self.endpoint_ms, 99),
            "endpoint_cpu_p50_ms": percentile(self.endpoint_cpu_ms, 50),
            "answer_p50_ms": percentile(self.answer_ms, 50),
            "answer_p99_ms": percentile(self.answer_ms, 99),
            "orjson_loads_p50_ms": percentile(self.parse_ms, 50),
            "rules_fired": self.rules_fired,
        }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (with 20 runs, p99 is the slowest run)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)


@lru_cache(maxsize=1)
def _devnull():
    return open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def make_app(tmp: Path):
    """The app as gunicorn builds it, with auth off, the clock pinned and logs kept off the terminal."""
    from service import create_app, logs

    # Attach the service's JSON log handler first, so its start-up lines go to /dev/null too.
    logs.configure("INFO")
    # The request log is still formatted for every call (as in production), then discarded.
    for handler in logging.getLogger("service").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_devnull())
    app = create_app({
        "AUTH": "disabled",
        "NOW": data.NOW,
        "RULES_POLL_SECONDS": 0,
        "DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
    })
    # As gunicorn.conf.py does in the master before forking workers.
    from service.app import freeze_long_lived_objects

    freeze_long_lived_objects()
    return app


def time_size(app, n: int, runs: int, warmup: int = 3, adversarial: bool = False) -> Timing:
    from service.cds_hooks import hooks
    from service.cds_hooks.services import SERVICES

    body = data.body(n, adversarial=adversarial)
    timing = Timing(n, runs, len(body))
    client = app.test_client()
    ext = app.extensions["calcinosis"]
    service = SERVICES[data.SERVICE_ID]

    for _ in range(warmup):
        response = client.post(ENDPOINT, data=body, content_type="application/json")
        if response.status_code != 200:
            raise SystemExit(f"in-process request at {n} Observations answered {response.status_code}: {response.get_data(as_text=True)[:500]}")
    timing.rules_fired = [c["source"].get("topic", {}).get("code", "?") for c in response.get_json()["cards"]]

    perf, cpu = time.perf_counter, time.process_time
    for _ in range(runs):
        started, started_cpu = perf(), cpu()
        response = client.post(ENDPOINT, data=body, content_type="application/json")
        timing.endpoint_ms.append((perf() - started) * 1000)
        timing.endpoint_cpu_ms.append((cpu() - started_cpu) * 1000)
        assert response.status_code == 200

    parsed = orjson.loads(body)
    # answer() reads ext.documentation_url, which needs a request context for the base URL.
    with app.test_request_context(ENDPOINT, method="POST", base_url="http://127.0.0.1"):
        for _ in range(runs):
            started = perf()
            parsed = orjson.loads(body)
            middle = perf()
            hooks.answer(service, parsed, ext)
            timing.answer_ms.append((perf() - middle) * 1000)
            timing.parse_ms.append((middle - started) * 1000)
    return timing


def run(plan: dict[int, int], log=print) -> list[Timing]:
    """Time every size in `plan` (Observations -> runs)."""
    with tempfile.TemporaryDirectory(prefix="calcinosis-bench-") as tmp:
        app = make_app(Path(tmp))
        results = []
        for n, runs in plan.items():
            data.body(n)  # generate outside the timed loop
            gc.collect()
            started = time.perf_counter()
            timing = time_size(app, n, runs, warmup=3 if n < 5000 else 2)
            s = timing.summary()
            log(
                f"  in-process {n:>5} Obs ({s['body_kb']:>7.1f} KB) x{runs:<3}: endpoint p50 {s['endpoint_p50_ms']:.2f} ms "
                f"p99 {s['endpoint_p99_ms']:.2f} ms (cpu p50 {s['endpoint_cpu_p50_ms']:.2f}) | answer() p50 {s['answer_p50_ms']:.2f} ms "
                f"| orjson.loads p50 {s['orjson_loads_p50_ms']:.2f} ms  [{time.perf_counter() - started:.1f} s]"
            )
            results.append(timing)
        return results


def profile(sizes: dict[int, int], out_dir: Path, log=print) -> dict[int, Path]:
    """Profile the endpoint path with pyinstrument; write one text report per size."""
    from pyinstrument import Profiler

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory(prefix="calcinosis-bench-") as tmp:
        app = make_app(Path(tmp))
        client = app.test_client()
        for n, runs in sizes.items():
            body = data.body(n)
            for _ in range(2):
                client.post(ENDPOINT, data=body, content_type="application/json")
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for _ in range(runs):
                client.post(ENDPOINT, data=body, content_type="application/json")
            profiler.stop()
            text = profiler.output_text(unicode=True, color=False, show_all=False)
            path = out_dir / f"profile-{n}.txt"
            path.write_text(text)
            html = out_dir / f"profile-{n}.html"
            html.write_text(profiler.output_html())
            log(f"  profile at {n} Obs x{runs}: {path} (and {html.name})")
            written[n] = path
    return written


def adversarial(app_or_none=None, n: int = 5000, runs: int = 10, log=print) -> dict:
    """Time the plain and the adversarial chart of the same size; print adversarial/plain."""
    with tempfile.TemporaryDirectory(prefix="calcinosis-bench-") as tmp:
        app = app_or_none or make_app(Path(tmp))
        plain = time_size(app, n, runs, warmup=2)
        hostile = time_size(app, n, runs, warmup=2, adversarial=True)
    p, h = plain.summary(), hostile.summary()
    result = {
        "observations": n,
        "plain_endpoint_p50_ms": p["endpoint_p50_ms"],
        "adversarial_endpoint_p50_ms": h["endpoint_p50_ms"],
        "ratio": round(h["endpoint_p50_ms"] / p["endpoint_p50_ms"], 2) if p["endpoint_p50_ms"] else None,
        "plain_rules_fired": p["rules_fired"],
        "adversarial_rules_fired": h["rules_fired"],
    }
    log(
        f"  adversarial chart {n} Obs (80% unusable and newest): endpoint p50 {result['adversarial_endpoint_p50_ms']:.2f} ms "
        f"vs plain {result['plain_endpoint_p50_ms']:.2f} ms: ratio {result['ratio']}x (target <= {ADVERSARIAL_TARGET:g}x)"
    )
    return result


ADVERSARIAL_TARGET = 1.5


def ratio(results: list[Timing], big: int = 5000, small: int = 1000, key: str = "endpoint_p50_ms") -> float | None:
    by_n = {t.n: t.summary() for t in results}
    if big in by_n and small in by_n and by_n[small][key]:
        return round(by_n[big][key] / by_n[small][key], 2)
    return None

