"""The benchmark's own arithmetic and apps (no servers, no installs): what `make bench` reports rests on these."""
from __future__ import annotations

import json

from bench import floor, load, machine, peer
from bench.__main__ import paired_ratio, summarise


def run(rps: float, requests: int, p99: float = 10.0) -> load.LoadResult:
    return load.LoadResult("wrk", requests, requests / rps, 0, 1.0, 2.0, p99, p99)


def usage(cpu_seconds: float, others: float = 0.0) -> machine.Usage:
    return machine.Usage(1.0, others, 1.0, 0.0, cpu_seconds)


def test_ratios_are_the_median_of_per_round_ratios_so_a_noisy_round_does_not_decide():
    runs = {
        "service": [(run(100, 100), usage(0)), (run(200, 200), usage(0)), (run(30, 30), usage(0))],
        # The third round was slowed for both servers alike: its ratio is still 3, not 30/100.
        "peer": [(run(100, 100), usage(0)), (run(100, 100), usage(0)), (run(10, 10), usage(0))],
    }
    assert paired_ratio(runs, "service", "peer") == 2.0


def test_cpu_per_request_is_the_servers_cpu_over_all_rounds_divided_by_their_requests():
    point = summarise([(run(100, 300, p99=9), usage(0.6)), (run(50, 100, p99=30), usage(0.4)), (run(80, 200, p99=12), usage(0.2))])
    assert point["server_cpu_ms_per_request"] == round(1000 * 1.2 / 600, 2)
    assert point["rps"] == 80.0  # the median round, not the mean
    assert point["p99_ms"] == 12.0
    assert point["requests"] == 600


def test_the_floor_parses_the_body_and_answers_one_constant_card():
    client = floor.create_app().test_client()
    body = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "p1"}, "prefetch": {}}
    response = client.post("/cds-services/calcinosis-risk", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert [c["source"]["topic"]["code"] for c in response.get_json()["cards"]] == ["calciphylaxis-risk"]
    assert client.post("/cds-services/calcinosis-risk", data="[1, 2]", content_type="application/json").status_code == 400


def test_the_peer_runs_from_its_own_virtualenv_with_uvicorn_workers_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setattr(peer, "VENV", tmp_path / "venv")
    monkeypatch.setattr(peer, "STAMP", tmp_path / "venv" / "bench-requirements.txt")
    command = peer.command(8123, 2)
    assert command[0] == str(tmp_path / "venv" / "bin" / "python")
    assert "uvicorn.workers.UvicornWorker" in command and "127.0.0.1:8123" in command
    assert command[command.index("--workers") + 1] == "2"
    assert "healthchain==0.16.1" in peer.REQUIREMENTS
    assert not peer.ready()  # nothing installed there: ensure() would install the pinned set


def test_the_floor_runs_under_plain_gunicorn_and_the_service_under_its_config():
    plain = load.gunicorn_command(load.FLOOR_APP, 8124, config=False)
    configured = load.gunicorn_command(load.SERVICE_APP, 8125)
    assert "--config" not in plain and plain[plain.index("--workers") + 1] == "2"
    assert configured[configured.index("--config") + 1].endswith("gunicorn.conf.py")
    assert all("127.0.0.1:" in c[c.index("--bind") + 1] for c in (plain, configured))
