"""The peer's own virtualenv: HealthChain 0.16.1, pinned, never in the project's dependencies.

`ensure()` creates `bench/.cache/peer-healthchain-0.16.1/` (git-ignored) on first use and
installs the pinned packages with pip from the configured package index; later runs
reuse it. `command()` is how `bench.load` starts the peer: gunicorn with uvicorn workers
(uvicorn picks uvloop and httptools when they are installed, as they are here).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
# The peer as the issue measured it. uvicorn's "auto" loop and HTTP parser take uvloop and httptools.
REQUIREMENTS = ("healthchain==0.16.1", "uvicorn==0.55.0", "uvloop==0.23.0", "httptools==0.9.0", "gunicorn==27.0.1")
VENV = CACHE / "peer-healthchain-0.16.1"
STAMP = VENV / "bench-requirements.txt"
INSTALL_TIMEOUT = 900  # seconds; pip resolves and downloads ~60 packages on first use


def python() -> Path:
    return VENV / "bin" / "python"


def ready() -> bool:
    return STAMP.is_file() and STAMP.read_text().split() == list(REQUIREMENTS) and python().exists()


def ensure(log=print) -> Path:
    """The peer virtualenv's python, installing it first if needed; raises RuntimeError if that fails."""
    if ready():
        return python()
    log(f"  installing the peer ({', '.join(REQUIREMENTS)}) into {VENV} (once; up to {INSTALL_TIMEOUT // 60} minutes)")
    CACHE.mkdir(exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"installing the peer took over {INSTALL_TIMEOUT} s: {' '.join(step)}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"installing the peer failed ({' '.join(step[:4])} ...):\n{done.stderr[-1500:]}")
    STAMP.write_text("\n".join(REQUIREMENTS) + "\n")
    return python()


def command(port: int, workers: int) -> list[str]:
    """gunicorn with uvicorn workers serving `bench/peer_app.py` on 127.0.0.1:`port`."""
    return [
        str(python()), "-m", "gunicorn", "--pythonpath", str(BENCH), "--worker-class", "uvicorn.workers.UvicornWorker",
        "--workers", str(workers), "--bind", f"127.0.0.1:{port}", "--timeout", "30", "peer_app:app",
    ]
