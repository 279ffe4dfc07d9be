"""The service as production runs it: gunicorn with gunicorn.conf.py, on loopback.

A test-sized load across two worker processes (bounded in count and time), and
SIGHUP with a broken rule set, which must leave the last good set serving.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service.engine.loader import load_ruleset
from service.harness import load_expectations
from tests.conftest import FIXTURES, RULES
from tests.requests_builder import request_with_prefetch

ROOT = RULES.parent
RULESET = load_ruleset(RULES)
SCENARIOS = sorted(p.name for p in FIXTURES.glob("*.json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, rules_dir) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(
        os.environ,
        CDS_AUTH="disabled",
        CDS_RULES_DIR=str(rules_dir),
        CDS_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        CDS_NOW="2026-11-01T12:00:00Z",
        CDS_RULES_POLL_SECONDS="0",
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    (tmp_path / "metrics").mkdir(exist_ok=True)
    # A file, not a pipe: an unread pipe fills up with log lines and blocks the workers.
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{port}", "service:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return process, base
        try:
            if requests.get(base + "/healthz", timeout=1).ok:
                return process, base
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("gunicorn did not start within 30 s")


@pytest.fixture
def served(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    process, base = start(tmp_path, rules)
    yield process, base, rules
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def test_a_few_thousand_requests_across_workers_all_answer_correctly(served):
    process, base, _ = served
    bodies = [(name, request_with_prefetch(name)) for name in SCENARIOS]
    expectations = load_expectations(FIXTURES)
    expected = {name: set(expectations[name].expect) for name in SCENARIOS}
    total = 2000
    deadline = time.monotonic() + 120

    def worker(offset: int) -> list[str]:
        problems = []
        with requests.Session() as session:
            for i in range(offset, total, 8):
                if time.monotonic() > deadline:
                    problems.append("time bound reached")
                    break
                name, body = bodies[i % len(bodies)]
                response = session.post(base + "/cds-services/calcinosis-risk", json=body, timeout=10)
                got = {c["source"]["topic"]["code"] for c in response.json().get("cards", [])} if response.ok else None
                if got != expected[name]:
                    problems.append(f"{name}: {response.status_code} {got}")
        return problems

    with ThreadPoolExecutor(8) as pool:
        problems = [p for chunk in pool.map(worker, range(8)) for p in chunk]
    assert problems == []
    metrics = requests.get(base + "/metrics", timeout=5).text
    served_count = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("cds_requests_total{") and 'endpoint="invoke"' in line and 'status="200"' in line
    )
    assert served_count == total  # counted across both workers


def test_a_broken_rule_set_at_start_exits_with_the_error(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    (rules / "tumoral-calcinosis.yaml").write_text("id: tumoral-calcinosis\n")
    process, _ = start(tmp_path, rules)
    assert process.wait(timeout=30) != 0
    assert b"tumoral-calcinosis.yaml" in (tmp_path / "gunicorn.log").read_bytes()


def test_sighup_with_a_broken_rule_set_keeps_the_last_good_set(served):
    process, base, rules = served
    body = request_with_prefetch("esrd-dialysis-high-product.json")
    path = rules / "calciphylaxis-risk.yaml"
    path.write_text(path.read_text().replace("operator: ge, value: 70", "operator: ge, value: 80"))
    process.send_signal(signal.SIGHUP)
    time.sleep(3)
    answer = requests.post(base + "/cds-services/calcinosis-risk", json=body, timeout=10).json()
    assert answer == {"cards": []}  # the valid edit (threshold 80) is serving
    path.write_text("id: [broken\n")
    process.send_signal(signal.SIGHUP)
    time.sleep(3)
    assert process.poll() is None
    assert requests.post(base + "/cds-services/calcinosis-risk", json=body, timeout=10).json() == {"cards": []}
    status = requests.get(base + "/status", timeout=5).json()["rules"]
    assert any("calciphylaxis-risk.yaml" in e for e in status["last_reload_errors"])
