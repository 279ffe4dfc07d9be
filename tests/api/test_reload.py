"""Safe reload: a broken rule set never replaces the working one, and never takes the service down."""
from __future__ import annotations

import shutil
import time

import pytest

from service.engine.loader import RuleSetError
from tests.conftest import RULES, make_app
from tests.requests_builder import request_with_prefetch

URL = "/cds-services/calcinosis-risk"


@pytest.fixture
def rules(tmp_path):
    folder = tmp_path / "rules"
    shutil.copytree(RULES, folder)
    return folder


def codes(client) -> list[str]:
    response = client.post(URL, json=request_with_prefetch("esrd-dialysis-high-product.json"))
    return [c["source"]["topic"]["code"] for c in response.json["cards"]]


def test_a_broken_rule_set_at_start_stops_the_service_with_a_clear_error(tmp_path, rules):
    (rules / "calciphylaxis-risk.yaml").write_text("id: calciphylaxis-risk\nwhen: {fact: nope, operator: gt, value: 1}\n")
    with pytest.raises(RuleSetError) as raised:
        make_app(tmp_path, RULES_DIR=str(rules))
    assert "calciphylaxis-risk.yaml" in str(raised.value)


def test_a_broken_edit_is_refused_and_the_last_good_set_keeps_serving(tmp_path, rules):
    app = make_app(tmp_path, RULES_DIR=str(rules))
    client = app.test_client()
    before = client.get("/status").json["rules"]["fingerprint"]
    path = rules / "calciphylaxis-risk.yaml"
    path.write_text(path.read_text().replace("operator: ge, value: 70", "operator: gte, value: 70"))
    assert app.extensions["calcinosis"].rules.refresh() is False
    status = client.get("/status").json["rules"]
    assert status["fingerprint"] == before
    assert any("calciphylaxis-risk.yaml" in e and "gte" in e for e in status["last_reload_errors"])
    assert codes(client) == ["calciphylaxis-risk"]


def test_a_valid_edit_is_served_after_reload_and_clears_the_error(tmp_path, rules):
    app = make_app(tmp_path, RULES_DIR=str(rules))
    client = app.test_client()
    path = rules / "calciphylaxis-risk.yaml"
    original = path.read_text()
    path.write_text(original.replace("operator: ge, value: 70", "operator: gte, value: 70"))
    app.extensions["calcinosis"].rules.refresh()
    path.write_text(original.replace("operator: ge, value: 70", "operator: ge, value: 80"))
    assert app.extensions["calcinosis"].rules.refresh() is True
    assert client.get("/status").json["rules"]["last_reload_errors"] is None
    assert codes(client) == []  # 74.9 is below the new threshold of 80


def test_the_watcher_picks_up_an_edit_without_a_restart(tmp_path, rules):
    app = make_app(tmp_path, RULES_DIR=str(rules), RULES_POLL_SECONDS=0.1)
    client = app.test_client()
    assert codes(client) == ["calciphylaxis-risk"]  # the first request starts the watcher
    path = rules / "calciphylaxis-risk.yaml"
    path.write_text(path.read_text().replace("operator: ge, value: 70", "operator: ge, value: 80"))
    deadline = time.monotonic() + 5
    while codes(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert codes(client) == []
