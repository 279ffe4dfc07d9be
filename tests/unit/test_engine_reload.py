"""RuleStore: refuse a broken edit, keep serving the last good set, swap whole sets atomically."""
from __future__ import annotations

import os
import threading

import pytest

from fakes import NOW, FakeRecord, days_ago, observation, rule_doc, write_ruleset
from service.engine.evaluate import evaluate
from service.engine.loader import RuleSetError
from service.engine.reloading import RuleStore


def threshold_rule(value: float) -> dict:
    return rule_doc("calcium-high", {"fact": "calcium", "operator": "gt", "value": value})


BROKEN = threshold_rule(10) | {"when": {"fact": "calcum", "operator": "gt", "value": 10}}


def edit(path, content) -> None:
    """Rewrite a rule file and move its modification time forward, so the change is always seen."""
    import yaml

    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    later = max(before + 1_000_000_000, path.stat().st_mtime_ns)
    os.utime(path, ns=(later, later))


def fires(ruleset, calcium: float) -> bool:
    record = FakeRecord(observations={"calcium": [observation(calcium, at=days_ago(1))]})
    return bool(evaluate(ruleset, record, NOW).fired)


@pytest.fixture
def root(tmp_path):
    return write_ruleset(tmp_path / "rules", {"calcium-high": threshold_rule(10)})


@pytest.fixture
def store(root):
    return RuleStore(root)


def test_store_refuses_to_start_on_a_broken_rule_set(tmp_path):
    root = write_ruleset(tmp_path / "rules", {"calcium-high": BROKEN})
    with pytest.raises(RuleSetError):
        RuleStore(root)


def test_unchanged_files_do_not_reload(store):
    before = store.current
    assert store.refresh() is None
    assert store.current is before
    assert store.status()["last_reload_attempt"] is None


def test_unchanged_files_do_not_notify_listeners(store):
    heard: list[bool] = []
    store.listeners.append(heard.append)
    store.refresh()
    assert heard == []


def test_forced_refresh_reloads_unchanged_files(store):
    before = store.current
    assert store.refresh(force=True) is True
    assert store.current is not before
    assert store.current.fingerprint == before.fingerprint


def test_valid_edit_is_loaded_on_refresh(store, root):
    assert fires(store.current, 11)
    edit(root / "calcium-high.yaml", threshold_rule(12))
    assert store.refresh() is True
    assert not fires(store.current, 11)
    assert fires(store.current, 13)


def test_broken_edit_is_refused_and_the_last_good_set_keeps_serving(store, root):
    good = store.current
    heard: list[bool] = []
    store.listeners.append(heard.append)
    edit(root / "calcium-high.yaml", BROKEN)
    assert store.refresh() is False
    assert store.current is good
    assert fires(store.current, 11)
    assert heard == [False]


def test_status_shows_the_errors_of_a_refused_reload(store, root):
    edit(root / "calcium-high.yaml", BROKEN)
    store.refresh()
    status = store.status()
    assert status["fingerprint"] == store.current.fingerprint
    assert status["rules"] == ["calcium-high"]
    assert status["last_reload_attempt"] is not None
    (error,) = status["last_reload_errors"]
    assert error.startswith("rules/calcium-high.yaml:")
    assert "unknown fact 'calcum' (did you mean 'calcium'?)" in error


def test_broken_set_is_not_read_again_until_it_changes(store, root):
    edit(root / "calcium-high.yaml", BROKEN)
    assert store.refresh() is False
    assert store.refresh() is None
    assert store.status()["last_reload_errors"]  # still reported


def test_fixing_the_file_reloads_and_clears_the_errors(store, root):
    edit(root / "calcium-high.yaml", BROKEN)
    store.refresh()
    edit(root / "calcium-high.yaml", threshold_rule(12))
    assert store.refresh() is True
    assert store.status()["last_reload_errors"] is None
    assert not fires(store.current, 11)


def test_new_rule_file_is_picked_up(store, root):
    edit(root / "phosphate-high.yaml", rule_doc("phosphate-high", {"fact": "phosphate", "operator": "gt", "value": 5}))
    assert store.refresh() is True
    assert [r.id for r in store.current.rules] == ["calcium-high", "phosphate-high"]


def test_changed_value_set_triggers_a_reload(store, root):
    path = root / "valuesets" / "calcium.yaml"
    edit(path, path.read_text() + "- system: http://loinc.org\n  code: 49765-1\n")
    assert store.refresh() is True
    assert ("http://loinc.org", "49765-1") in store.current.valuesets["calcium"].exact


def test_request_holding_current_keeps_its_set_while_a_reload_swaps(store, root):
    held = store.current
    edit(root / "calcium-high.yaml", threshold_rule(12))
    assert store.refresh() is True
    assert store.current is not held
    # The request that took the old set still decides with it, whole.
    assert fires(held, 11)
    assert held.rule("calcium-high").when.value == 10
    assert store.current.rule("calcium-high").when.value == 12


def test_reload_in_another_thread_does_not_change_a_held_set(store, root):
    held = store.current
    fingerprint = held.fingerprint
    edit(root / "calcium-high.yaml", threshold_rule(12))
    worker = threading.Thread(target=store.refresh)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert store.current is not held
    assert held.fingerprint == fingerprint
    assert fires(held, 11)
