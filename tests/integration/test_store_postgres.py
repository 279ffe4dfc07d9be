"""The store against a real PostgreSQL server, for deployments with several replicas.

Runs only when CDS_TEST_POSTGRES_URL names a database it may empty, e.g.
    CDS_TEST_POSTGRES_URL=postgresql://cds:cds@127.0.0.1/cds make test
"""
from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import pytest

from service.cds_hooks.feedback import FeedbackItem
from service.store import UNKNOWN_CARD_ROW, IssuedCard, Store

URL = os.environ.get("CDS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set CDS_TEST_POSTGRES_URL to run against PostgreSQL")
SERVICE = "calcinosis-risk"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store():
    import psycopg

    with psycopg.connect(URL, autocommit=True) as conn:
        for table in ("feedback", "issued_cards", "seen_jti", "schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    opened = Store.from_url(URL)
    yield opened
    opened.close()


def overridden(card: str, code: str | None = None) -> FeedbackItem:
    return FeedbackItem(card, "overridden", (), code, "urn:x" if code else None, code, None, NOW)


def test_feedback_is_joined_to_the_rule_and_unknown_cards_are_kept(store):
    store.record_cards("hook-1", SERVICE, [IssuedCard("card-1", "calciphylaxis-risk", "warning")], NOW)
    known, unknown = store.add_feedback(SERVICE, [overridden("card-1", "aware"), overridden("card-x")], NOW)
    assert known.rule_id == "calciphylaxis-risk" and known.known_card
    assert unknown.rule_id is None and not unknown.known_card
    rows = {r.rule_id: r for r in store.report()}
    assert rows["calciphylaxis-risk"].overridden == 1 and rows[UNKNOWN_CARD_ROW].overridden == 1


def test_rows_survive_a_new_store_on_the_same_database(store):
    store.record_cards("hook-1", SERVICE, [IssuedCard("card-1", "ckd-mbd-labs-due", "info")], NOW)
    store.add_feedback(SERVICE, [overridden("card-1")], NOW)
    again = Store.from_url(URL)
    try:
        assert {r.rule_id: r.overridden for r in again.report()} == {"ckd-mbd-labs-due": 1}
    finally:
        again.close()


def test_threads_adding_feedback_concurrently_lose_nothing(store):
    store.record_cards("hook-1", SERVICE, [IssuedCard("card-1", "calciphylaxis-risk", "warning")], NOW)

    def post() -> None:
        for _ in range(25):
            store.add_feedback(SERVICE, [overridden("card-1")], NOW)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (row,) = store.report()
    assert row.feedback_events == 150


def test_a_jti_is_admitted_once_even_when_raced(store):
    start = threading.Barrier(6)
    results: list[bool] = []

    def worker() -> None:
        start.wait()
        results.append(store.check_and_store_jti("iss", "raced", time.time() + 300))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]
    store.ping()
