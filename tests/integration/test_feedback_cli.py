"""`feedback report`, `feedback snoozes` and `rules explain --database`, on a store filled through HTTP."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import uuid

import pytest

from service.cli import feedback_main, rules_main
from tests.conftest import RULES, TEST_PATIENT_KEY, make_app
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"
REASONS = "urn:calcinosis-cds:override-reason"


@pytest.fixture
def filled(tmp_path):
    """Two patients' cards: one risk card overridden (snoozing), one accepted, a withheld repeat."""
    app = make_app(tmp_path, UUID=lambda: str(uuid.uuid4()))
    client = app.test_client()
    first = request_with_prefetch("esrd-dialysis-high-product.json")
    second = request_with_prefetch("esrd-skin-ulcer-scleroderma.json")
    cards = client.post(URL, json=first).json["cards"] + client.post(URL, json=second).json["cards"]
    by_rule: dict[str, list[dict]] = {}
    for card in cards:
        by_rule.setdefault(card["source"]["topic"]["code"], []).append(card)
    risk = by_rule["calciphylaxis-risk"][0]
    workup = by_rule["calciphylaxis-workup"][0]
    feedback = [
        {"card": risk["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-01T12:01:00Z",
         "overrideReason": {"reason": {"system": REASONS, "code": "already-addressed"}}},
        {"card": workup["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-01T12:02:00Z",
         "acceptedSuggestions": [{"id": workup["suggestions"][0]["uuid"]}]},
    ]
    assert client.post(URL + "/feedback", json={"feedback": feedback}).status_code == 200
    client.post(URL, json=first)  # withheld by the snooze
    return f"sqlite:///{tmp_path / 'store.db'}", by_rule, first


def test_report_as_json_counts_outcomes_reasons_suggestions_and_withheld_cards(filled, capsys):
    url, by_rule, _ = filled
    assert feedback_main(["report", "--database", url, "--format", "json"]) == 0
    rows = {r["rule"]: r for r in json.loads(capsys.readouterr().out)["rules"]}
    risk = rows["calciphylaxis-risk"]
    assert (risk["issued"], risk["overridden"], risk["withheld_by_snooze"]) == (len(by_rule["calciphylaxis-risk"]), 1, 1)
    assert risk["override_reasons"] == {"already-addressed": 1}
    workup = rows["calciphylaxis-workup"]
    assert (workup["accepted"], workup["suggestions_taken"]) == (1, 1)
    assert workup["acceptance_rate"] == round(1 / workup["issued"], 4)


def test_report_as_csv_has_a_header_and_a_line_per_rule(filled, capsys):
    url, by_rule, _ = filled
    assert feedback_main(["--database", url, "report", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["rule"] for r in rows} == set(by_rule)
    assert next(r for r in rows if r["rule"] == "calciphylaxis-risk")["override_reasons"] == "already-addressed=1"


def test_report_since_and_service_narrow_what_is_counted(filled, capsys):
    url, _, _ = filled
    assert feedback_main(["report", "--database", url, "--format", "json", "--since", "2026-11-02"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rules": []}
    assert feedback_main(["report", "--database", url, "--format", "json", "--service", "another-service"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rules": []}
    assert feedback_main(["report", "--database", url, "--since", "2026-11-01"]) == 0
    assert "calciphylaxis-risk" in capsys.readouterr().out


def test_a_bad_since_date_is_refused_with_its_reason(filled):
    url, _, _ = filled
    with pytest.raises(SystemExit, match="--since 'yesterday'"):
        feedback_main(["report", "--database", url, "--since", "yesterday"])


def test_snoozes_list_shows_no_patient_id_and_clear_lifts_them(filled, capsys):
    url, _, first = filled
    assert feedback_main(["snoozes", "list", "--database", url]) == 0
    out = capsys.readouterr().out
    assert "calciphylaxis-risk" in out and "already-addressed" in out and "until 2026-12-01" in out
    assert first["context"]["patientId"] not in out
    assert feedback_main(["snoozes", "clear", "--database", url, "--rule", "tumoral-calcinosis"]) == 0
    assert "lifted 0 snooze(s)" in capsys.readouterr().out
    assert feedback_main(["snoozes", "clear", "--database", url, "--rule", "calciphylaxis-risk"]) == 0
    assert "lifted 1 snooze(s)" in capsys.readouterr().out
    feedback_main(["snoozes", "list", "--database", url])
    assert "0 snooze(s)" in capsys.readouterr().out


def test_rules_explain_with_the_store_says_the_card_is_withheld(filled, tmp_path, capsys, monkeypatch):
    url, _, first = filled
    monkeypatch.setenv("CDS_PATIENT_KEY", TEST_PATIENT_KEY)
    request = tmp_path / "request.json"
    request.write_text(json.dumps(first))
    assert rules_main(["--rules", str(RULES), "explain", str(request), "--now", "2026-11-01T12:10:00Z", "--database", url]) == 0
    out = capsys.readouterr().out
    assert "calciphylaxis-risk: fired, withheld by snooze until 2026-12-01 (already-addressed)" in out
    # Without the store, the same patient's rule simply fired.
    assert rules_main(["--rules", str(RULES), "explain", str(request), "--now", "2026-11-01T12:10:00Z"]) == 0
    assert "calciphylaxis-risk: FIRED" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_the_html_report_shows_a_chart_per_rule_in_a_real_browser(filled, tmp_path, capsys):
    url, by_rule, _ = filled
    page = tmp_path / "report.html"
    assert feedback_main(["report", "--database", url, "--html", str(page)]) == 0
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # The DOM as the browser built it: one SVG chart per rule, each with its three series.
    for rule_id in by_rule:
        assert f'data-rule="{rule_id}"' in dom
    assert dom.count("<svg") == len(by_rule)
    assert dom.count('data-series="issued"') == dom.count('data-series="overridden"') == len(by_rule)
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}-2", f"--screenshot={screenshot}",
         "--window-size=800,1200", page.as_uri()],
        capture_output=True, timeout=60,
    )
    assert screenshot.exists() and screenshot.stat().st_size > 5000
