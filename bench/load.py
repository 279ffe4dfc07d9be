"""Over HTTP: the service, the floor and the peer, each under gunicorn with 2 workers, driven on loopback.

- the service: the repo's `gunicorn.conf.py` (sync workers);
- the floor (`bench/floor.py`): plain gunicorn, 2 sync workers, no config file;
- the peer (`bench/peer_app.py`): HealthChain under gunicorn with uvicorn workers, from its own virtualenv.

Every server binds 127.0.0.1 on a free port. The load generator is wrk when installed
(it takes the least CPU from the server on a 2-core machine), else a Python client with
threads. Every run is bounded in time, and the Python client also in request count.
"""
from __future__ import annotations

import http.client
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from . import data

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post.lua"
PATH = f"/cds-services/{data.SERVICE_ID}"
SERVICE_APP = "service:create_app()"
FLOOR_APP = "bench.floor:app"
WORKERS = 2


def gunicorn_command(app: str, port: int, *, config: bool = True) -> list[str]:
    """This interpreter's gunicorn serving `app`: with the repo's gunicorn.conf.py, or plain (2 sync workers)."""
    settings = ["--config", str(ROOT / "gunicorn.conf.py")] if config else ["--workers", str(WORKERS), "--worker-class", "sync"]
    return [sys.executable, "-m", "gunicorn", *settings, "--pythonpath", str(ROOT), "--bind", f"127.0.0.1:{port}", app]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}


def kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


@dataclass
class Memory:
    pid: int
    rss_kb: int
    hwm_kb: int

    @property
    def rss_mb(self) -> float:
        return round(self.rss_kb / 1024, 1)

    @property
    def hwm_mb(self) -> float:
        return round(self.hwm_kb / 1024, 1)


class Gunicorn:
    """One gunicorn master (the repo's config unless `command` says otherwise); stopped by its own pid (and its session)."""

    def __init__(self, app: str, workdir: Path, name: str, command=None) -> None:
        """`command(port)` gives the argv; by default this interpreter's gunicorn with gunicorn.conf.py."""
        self.app, self.name = app, name
        self.port = free_port()
        self.command = (command or (lambda port: gunicorn_command(app, port)))(self.port)
        # gunicorn reads ./gunicorn.conf.py when no --config is given: start outside the repo.
        self.cwd = workdir
        self.url = f"http://127.0.0.1:{self.port}{PATH}"
        self.log_path = workdir / f"gunicorn-{name}.log"
        metrics_dir = workdir / f"metrics-{name}"  # prometheus-client multiprocess files, removed with workdir
        metrics_dir.mkdir(exist_ok=True)
        self.env = dict(
            os.environ,
            WEB_CONCURRENCY=str(WORKERS),
            CDS_AUTH="disabled",
            CDS_DATABASE_URL=f"sqlite:///{workdir / f'{name}.db'}",
            CDS_NOW=data.NOW,
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            PYTHONUNBUFFERED="1",
        )
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Gunicorn":
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout=60)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        body = data.body(10)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn ({self.name}) exited with {self.proc.returncode}; see {self.log_path}:\n{self.tail()}")
            if len(self.workers()) == WORKERS:
                try:
                    status, _ = post(self.port, body, timeout=5)
                    if status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn ({self.name}) not ready within {timeout:.0f} s; see {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def workers(self) -> list[int]:
        """Worker pids: the master's children, from /proc."""
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return [int(d) for d in os.listdir("/proc") if d.isdigit() and read_status(int(d)).get("PPid") == str(self.proc.pid)]

    def memory(self) -> list[Memory]:
        out = []
        for pid in self.workers():
            status = read_status(pid)
            if status:
                out.append(Memory(pid, kb(status.get("VmRSS")), kb(status.get("VmHWM"))))
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # gunicorn: graceful stop of master and workers
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this Popen created, nothing else
            self.proc.wait(timeout=5)

    def __exit__(self, *exc) -> None:
        self.stop()


def post(port: int, body: bytes, timeout: float = 10) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    extra: dict = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return round(self.requests / self.seconds, 1) if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"tool": self.tool, "requests": self.requests, "seconds": round(self.seconds, 2), "errors": self.errors,
                "rps": self.rps, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms, **self.extra}


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, body_file: Path, seconds: float, connections: int, threads: int = 1) -> LoadResult:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
               "-s", str(LUA), url]
    done = subprocess.run(command, env=dict(os.environ, BENCH_BODY=str(body_file)), capture_output=True, text=True,
                          timeout=seconds + 60, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-800:]} {done.stderr[-800:]}")
    s = orjson.loads(line.removeprefix("BENCH_JSON "))
    errors = s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["status_errors"] + s["timeouts"]
    return LoadResult("wrk", s["requests"], s["duration_us"] / 1e6, errors, s["p50_us"] / 1000, s["p90_us"] / 1000,
                      s["p99_us"] / 1000, s["max_us"] / 1000, {"error_detail": {k: v for k, v in s.items() if k.endswith(("errors", "timeouts"))}})


def run_python(port: int, body: bytes, seconds: float, connections: int, max_requests: int = 200_000) -> LoadResult:
    """Fallback load generator: `connections` threads, each one request at a time, new connection each."""
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    budget = [max_requests]

    def loop() -> None:
        mine: list[float] = []
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            started = time.perf_counter()
            try:
                status, _ = post(port, body, timeout=10)
                if status != 200:
                    errors[0] += 1
            except OSError:
                errors[0] += 1
                continue
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    began = time.monotonic()
    workers = [threading.Thread(target=loop, daemon=True) for _ in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 30)
    elapsed = time.monotonic() - began
    ordered = sorted(latencies) or [math.nan]
    pick = lambda p: round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 2)  # noqa: E731
    return LoadResult("python", len(latencies), elapsed, errors[0], pick(50), pick(90), pick(99), round(ordered[-1], 2))


def drive(server: Gunicorn, body_file: Path, seconds: float, connections: int, tool: str) -> LoadResult:
    if tool == "wrk":
        return run_wrk(server.url, body_file, seconds, connections)
    return run_python(server.port, body_file.read_bytes(), seconds, connections)


def check_answer(server: Gunicorn, body: bytes) -> dict:
    """One request before the load: 200 and the expected cards, or stop."""
    status, payload = post(server.port, body, timeout=30)
    if status != 200:
        raise RuntimeError(f"{server.name} answered {status}: {payload[:300]!r}")
    cards = orjson.loads(payload).get("cards", [])
    return {"cards": len(cards), "rules": [c.get("source", {}).get("topic", {}).get("code") for c in cards]}
