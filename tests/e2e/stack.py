"""The servers of an end-to-end run, each on 127.0.0.1 and a port the OS picks (bind to port 0).

- the service under gunicorn with the repository's gunicorn.conf.py, auth enabled, the
  evaluation clock pinned to the fixtures' moment, its own SQLite store and JSON log file;
- the sandbox's static files.

The FHIR test server lives in tests/fhir_test_server.py.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from service.config import PROJECT_ROOT
from tests.conftest import SCENARIO_TIME, TEST_PATIENT_KEY

SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
CDS_NOW = SCENARIO_TIME.strftime("%Y-%m-%dT%H:%M:%SZ")
START_TIMEOUT = 45.0


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the test process dies, so no gunicorn outlives a killed run."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    """A running gunicorn master and what a test reads from it: its URL, log and store."""

    process: subprocess.Popen
    base_url: str
    log_path: Path
    db_path: Path

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def log_events(self, since: int = 0) -> list[dict]:
        """The service's JSON log lines from byte `since` on; gunicorn's own plain lines are skipped."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            lines = log.read().splitlines()
        events = []
        for line in lines:
            if line.startswith(b"{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue  # a line still being written
        return events

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def sandbox_issuer(jwks: dict, fhir_server) -> dict:
    """Trust the sandbox's iss with `jwks` pinned inline (no JWKS fetch), for the FHIR test server only."""
    return {SANDBOX_ISSUER: {"jwks": jwks, "fhir_servers": [fhir_server.base_url]}}


def start_service(workdir: Path, issuers: dict, *, workers: int = 2) -> Service:
    """Run the service as production does, trusting `issuers` (iss -> settings, keys inline).

    The test binds the socket (port 0) and hands it to gunicorn (`fd://`), so the port is
    known before start, as CDS_PUBLIC_BASE_URL (the JWT audience) needs, and nobody can take
    it in between.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics").mkdir(exist_ok=True)
    issuers_file = workdir / "trusted-issuers.json"
    issuers_file.write_text(json.dumps(issuers, indent=2))
    db_path = workdir / "store.db"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    env = dict(
        os.environ,
        CDS_AUTH="enabled",
        CDS_TRUSTED_ISSUERS=str(issuers_file),
        CDS_NOW=CDS_NOW,
        CDS_DATABASE_URL=f"sqlite:///{db_path}",
        CDS_RULES_POLL_SECONDS="0",
        CDS_PUBLIC_BASE_URL=base_url,
        CDS_PATIENT_KEY=TEST_PATIENT_KEY,  # auth is on, so the store's keyed hashes need their secret
        WEB_CONCURRENCY=str(workers),
        PROMETHEUS_MULTIPROC_DIR=str(workdir / "metrics"),
    )
    log_path = workdir / "service.log"
    # A file, not a pipe: nobody reads a pipe while the browser runs, and a full pipe blocks workers.
    with listener, log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(PROJECT_ROOT / "gunicorn.conf.py"),
             "--bind", f"fd://{listener.fileno()}", "service:create_app()"],
            cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),), preexec_fn=_die_with_parent,
        )
    service = Service(process, base_url, log_path, db_path)
    _wait_ready(service, time.monotonic() + START_TIMEOUT)
    return service


def _wait_ready(service: Service, deadline: float) -> None:
    import requests

    problem = "no answer"
    while time.monotonic() < deadline and service.process.poll() is None:
        try:
            answer = requests.get(service.base_url + "/readyz", timeout=2)
            if answer.ok:
                return
            problem = f"/readyz answered {answer.status_code}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(
        f"the service was not ready within {START_TIMEOUT:.0f} s ({problem}; exit code {service.process.poll()}); "
        f"its log {service.log_path} ends:\n{service.log_tail()}"
    )


class StaticFiles:
    """Serve a folder read-only on 127.0.0.1 (the sandbox's built files)."""

    def __init__(self, folder: Path) -> None:
        class Quiet(SimpleHTTPRequestHandler):
            timeout = 10

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sandbox-static", daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
