"""The feedback store against a real SQLite file, and against PostgreSQL when one is given.

PostgreSQL runs when CDS_TEST_POSTGRES_URL names a database the tests may empty, e.g.
    CDS_TEST_POSTGRES_URL=postgresql://cds:cds@127.0.0.1/cds make test
Tests that inspect the SQLite file itself (they ask for `db_path`) run on SQLite only.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import re
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from service.cds_hooks.feedback import FeedbackItem
from service.store import (
    SCHEMA_VERSION,
    Snooze,
    UNKNOWN_CARD_ROW,
    IssuedCard,
    RuleReport,
    Store,
    StoreError,
    format_report,
)

SERVICE = "calcinosis-risk"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def url_for(path: Path) -> str:
    """sqlite URL for an absolute path (four slashes, SQLAlchemy style)."""
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    # A nested folder proves from_url creates missing parents.
    return tmp_path / "state" / "nested" / "feedback.db"


POSTGRES_URL = os.environ.get("CDS_TEST_POSTGRES_URL")
BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(not POSTGRES_URL, reason="set CDS_TEST_POSTGRES_URL")),
]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path: Path) -> str:
    """A fresh, empty store's URL on each backend."""
    if request.param == "sqlite":
        return url_for(request.getfixturevalue("db_path"))
    if "db_path" in request.fixturenames:
        pytest.skip("inspects the SQLite file itself")
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for table in ("feedback", "issued_cards", "seen_jti", "snoozes", "withheld_cards", "schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    return POSTGRES_URL


@pytest.fixture
def store(store_url: str):
    opened = Store.from_url(store_url)
    yield opened
    opened.close()


def accepted(card: str, suggestion: str = "s-1") -> FeedbackItem:
    return FeedbackItem(card, "accepted", (suggestion,), None, None, None, None, NOW)


def overridden(
    card: str, code: str | None = None, display: str | None = None, comment: str | None = None
) -> FeedbackItem:
    system = "https://example.org/override" if code else None
    return FeedbackItem(card, "overridden", (), code, system, display, comment, NOW)


def issue(store: Store, rule_id: str, *uuids: str, service_id: str = SERVICE) -> None:
    store.record_cards(
        "hook-1", service_id, [IssuedCard(u, rule_id, "warning", (f"{u}-s",)) for u in uuids], NOW
    )


def total_feedback(store: Store) -> int:
    return sum(row.feedback_events for row in store.report())


def test_feedback_on_a_recorded_card_is_joined_to_its_rule(store):
    issue(store, "calciphylaxis-risk", "card-a", "card-b")
    stored = store.add_feedback(SERVICE, [accepted("card-a"), overridden("card-b")], NOW)
    assert [(s.card, s.rule_id, s.known_card, s.outcome) for s in stored] == [
        ("card-a", "calciphylaxis-risk", True, "accepted"),
        ("card-b", "calciphylaxis-risk", True, "overridden"),
    ]
    assert len({s.feedback_id for s in stored}) == 2


def test_feedback_on_an_unknown_card_is_kept_and_flagged(db_path, store):
    [stored] = store.add_feedback(SERVICE, [overridden("never-issued")], NOW)
    assert stored.known_card is False and stored.rule_id is None
    with sqlite3.connect(db_path) as raw:
        rows = raw.execute("SELECT card_uuid, known_card, rule_id FROM feedback").fetchall()
    raw.close()
    assert rows == [("never-issued", 0, None)]
    [row] = store.report()
    assert row.rule_id == UNKNOWN_CARD_ROW and row.unknown_cards and row.overridden == 1


def test_a_card_issued_by_another_service_counts_as_unknown(store):
    issue(store, "other-rule", "card-x", service_id="other-service")
    [stored] = store.add_feedback(SERVICE, [accepted("card-x")], NOW)
    assert not stored.known_card


def test_repeated_feedback_for_one_card_is_kept_as_separate_rows(store):
    issue(store, "r1", "card-a")
    store.add_feedback(SERVICE, [overridden("card-a")], NOW)
    store.add_feedback(SERVICE, [overridden("card-a")], NOW + timedelta(minutes=1))
    [row] = store.report()
    assert row.feedback_events == 2
    # Counted once as a card: the report answers "how many cards were overridden".
    assert row.overridden == 1


def test_recording_the_same_card_twice_keeps_one_card(store):
    issue(store, "r1", "card-a")
    issue(store, "r1", "card-a")
    assert store.report()[0].cards_issued == 1


def test_no_patient_data_columns_exist(db_path, store):
    issue(store, "r1", "card-a")
    store.add_feedback(SERVICE, [overridden("card-a", comment="Mrs Smith, MRN 1234, declined")], NOW)
    wal = db_path.with_name(db_path.name + "-wal")
    raw = db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    # Free-text comments may name the patient, so only the fact that one existed is stored.
    assert b"Mrs Smith" not in raw and b"MRN 1234" not in raw


def test_rows_survive_closing_and_reopening_the_store(store_url):
    first = Store.from_url(store_url)
    issue(first, "r1", "card-a")
    first.add_feedback(SERVICE, [accepted("card-a")], NOW)
    assert first.check_and_store_jti("issuer", "jti-1", time.time() + 300)
    first.close()

    second = Store.from_url(store_url)
    try:
        [row] = second.report()
        assert (row.rule_id, row.cards_issued, row.accepted) == ("r1", 1, 1)
        assert not second.check_and_store_jti("issuer", "jti-1", time.time() + 300)
    finally:
        second.close()


def test_database_opens_in_wal_mode_with_a_recorded_schema_version(db_path, store):
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()


def test_a_database_from_a_newer_schema_is_refused(db_path, store):
    store.close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        Store.from_url(url_for(db_path))


def test_eight_threads_adding_feedback_concurrently_lose_nothing(store):
    issue(store, "r1", *[f"card-{n}" for n in range(8)])
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait()
            for _ in range(50):
                store.add_feedback(SERVICE, [overridden(f"card-{n}", code="c1")], NOW)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert total_feedback(store) == 400


def _process_writer(url: str, worker: int, count: int, start) -> None:
    """Runs in a spawned process: open the store itself and write feedback and jtis."""
    store = Store.from_url(url)
    try:
        # Bounded wait: if a sibling died before the barrier, fail instead of hanging.
        start.wait(timeout=60)
        for n in range(count):
            store.add_feedback(SERVICE, [accepted(f"card-{worker}-{n}")], NOW)
            store.check_and_store_jti("issuer", f"jti-{worker}-{n}", time.time() + 300)
    finally:
        store.close()


def test_three_processes_writing_concurrently_lose_nothing(store_url, store):
    url = store_url
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    processes = [
        context.Process(target=_process_writer, args=(url, worker, 60, start), daemon=True)
        for worker in range(3)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + 120
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in processes] == [0, 0, 0]
    finally:
        # A hung child must not keep pytest from exiting.
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert total_feedback(store) == 180
    # Every jti written by the children is now seen as a replay here.
    assert not any(
        store.check_and_store_jti("issuer", f"jti-{w}-{n}", time.time() + 300)
        for w in range(3) for n in range(60)
    )


def test_a_jti_is_accepted_once_and_a_replay_is_refused(store):
    expires = time.time() + 300
    assert store.check_and_store_jti("https://ehr.example", "abc", expires) is True
    assert store.check_and_store_jti("https://ehr.example", "abc", expires) is False
    # Same jti from a different issuer is a different token.
    assert store.check_and_store_jti("https://other.example", "abc", expires) is True


def test_a_replay_is_refused_across_two_stores_on_the_same_database(store_url, store):
    other = Store.from_url(store_url)
    try:
        assert store.check_and_store_jti("iss", "shared", time.time() + 300)
        assert not other.check_and_store_jti("iss", "shared", time.time() + 300)
    finally:
        other.close()


def test_concurrent_replays_of_one_jti_admit_exactly_one(store):
    start = threading.Barrier(8)
    results: list[bool] = []

    def worker() -> None:
        start.wait()
        results.append(store.check_and_store_jti("iss", "raced", time.time() + 300))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_a_jti_whose_record_has_expired_is_pruned(db_path, store):
    assert store.check_and_store_jti("iss", "old", time.time() - 10)
    store._next_prune = 0.0  # force the occasional prune to run on the next call
    assert store.check_and_store_jti("iss", "new", time.time() + 300)
    with sqlite3.connect(db_path) as raw:
        remaining = [r[0] for r in raw.execute("SELECT jti FROM seen_jti ORDER BY jti")]
    raw.close()
    assert remaining == ["new"]


def test_report_counts_cards_outcomes_and_top_three_override_reasons(store):
    issue(store, "calciphylaxis-risk", *[f"r-{n}" for n in range(6)])
    issue(store, "calcinosis-workup", "w-1", "w-2")
    store.add_feedback(
        SERVICE,
        [
            accepted("r-0"),
            overridden("r-1", code="not-indicated", display="Not clinically indicated"),
            overridden("r-2", code="not-indicated", display="Not clinically indicated"),
            overridden("r-3", code="not-indicated"),
            overridden("r-4", code="pt-declined", display="Patient declined"),
            overridden("r-5", comment="free text"),
            overridden("r-5"),
            overridden("r-4", code="zz-other"),
            accepted("w-1"),
            overridden("ghost", code="pt-declined"),
        ],
        NOW,
    )
    rows = {row.rule_id: row for row in store.report()}
    assert list(rows) == ["calcinosis-workup", "calciphylaxis-risk", UNKNOWN_CARD_ROW]
    risk = rows["calciphylaxis-risk"]
    assert (risk.cards_issued, risk.accepted, risk.overridden, risk.feedback_events) == (6, 1, 5, 8)
    # Same code with and without a display is one reason, labelled by its most common display.
    assert risk.top_override_reasons == (
        ("Not clinically indicated", 3),
        ("(comment only)", 1),
        ("(no reason given)", 1),
    )
    # The full list keeps the reasons that the top three leave out.
    assert len(risk.override_reasons) == 5 and risk.override_reasons[-1] == ("zz-other", 1)
    assert rows["calcinosis-workup"] == RuleReport("calcinosis-workup", 2, 1, 0, 1, (), suggestions_taken=1)
    ghost = rows[UNKNOWN_CARD_ROW]
    assert (ghost.cards_issued, ghost.overridden, ghost.top_override_reasons) == (0, 1, (("pt-declined", 1),))


def test_report_can_be_limited_to_one_service(store):
    issue(store, "r1", "a-1")
    issue(store, "r2", "b-1", service_id="other-service")
    assert [row.rule_id for row in store.report(SERVICE)] == ["r1"]
    assert [row.rule_id for row in store.report()] == ["r1", "r2"]


def test_format_report_renders_an_aligned_table(store):
    issue(store, "calciphylaxis-risk", "a", "b", "c", "d")
    issue(store, "short", "e")
    store.add_feedback(SERVICE, [accepted("a"), overridden("b", code="x", display="Already treated")], NOW)
    lines = format_report(store.report()).splitlines()
    assert lines[0].split() == ["RULE", "ISSUED", "ACCEPTED", "OVERRIDDEN", "ACCEPT", "RATE", "SUGGESTIONS",
                                "TAKEN", "WITHHELD", "OVERRIDE", "REASONS"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split()[:7] == ["calciphylaxis-risk", "4", "1", "1", "25%", "1", "0"]
    assert lines[2].endswith("Already treated (1)")
    assert lines[3].split() == ["short", "1", "0", "0", "0%", "0", "0", "-"]
    # The dash rule gives each column's span; numbers must end flush with their column.
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[1])]
    for line in lines[2:4]:
        for start, end in spans[1:7]:
            assert line[end - 1] != " " and (start == 0 or line[start - 1] == " ")


def test_format_report_of_an_empty_store_says_so(store):
    assert "no cards issued" in format_report(store.report())


def test_naive_timestamps_are_refused_rather_than_guessed(store):
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record_cards("h", SERVICE, [IssuedCard("c", "r", "info")], datetime(2024, 1, 1))


def test_ping_succeeds_on_an_open_store_and_fails_once_closed(store):
    store.ping()
    store.close()
    with pytest.raises(StoreError):
        store.ping()


def test_memory_and_unsupported_urls_are_refused_without_echoing_credentials():
    with pytest.raises(StoreError, match="file path"):
        Store.from_url("sqlite:///:memory:")
    with pytest.raises(StoreError) as caught:
        Store.from_url("mysql://admin:s3cret@db/cds")
    assert "s3cret" not in str(caught.value)


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg is installed")
def test_postgres_url_without_psycopg_says_how_to_install_it():
    with pytest.raises(StoreError, match=r"pip install 'calcinosis-cds\[postgres\]'"):
        Store.from_url("postgresql://cds:secret@localhost/cds")


# --- snoozes --------------------------------------------------------------------------------------

REASON_SYSTEM = "urn:calcinosis-cds:override-reason"
PATIENT = "a" * 64  # a keyed hash, as the service stores it


def snooze_30_days(rule_id: str, code: str) -> timedelta | None:
    return timedelta(days=30) if code == "already-addressed" else None


def issue_for_patient(store: Store, card: str, patient: str = PATIENT, fingerprint: str = "fp-1") -> None:
    offered = ((REASON_SYSTEM, "already-addressed"), (REASON_SYSTEM, "data-incorrect"))
    store.record_cards("hook-1", SERVICE, [IssuedCard(card, "r1", "warning", (), offered, fingerprint)], NOW, patient)


def dismissed(card: str, code: str, system: str = REASON_SYSTEM) -> FeedbackItem:
    return FeedbackItem(card, "overridden", (), code, system, None, None, NOW)


def test_overridden_feedback_with_a_snoozing_reason_sets_a_snooze_other_stores_see(store_url, store):
    issue_for_patient(store, "card-a")
    [stored] = store.add_feedback(SERVICE, [dismissed("card-a", "already-addressed")], NOW, snooze_30_days)
    assert stored.reason_offered is True
    assert stored.snooze == Snooze(SERVICE, "r1", PATIENT, "already-addressed", "warning", "fp-1", "hook-1", NOW, NOW + timedelta(days=30))
    with Store.from_url(store_url) as other:  # another worker, or the service after a restart
        assert other.snoozes_for(SERVICE, PATIENT, ["r1", "r2"]) == {"r1": stored.snooze}
        assert other.snoozes_for(SERVICE, "b" * 64, ["r1"]) == {}
        assert other.snoozes_for("other-service", PATIENT, ["r1"]) == {}


def test_a_reason_without_a_snooze_or_not_offered_sets_none(store):
    issue_for_patient(store, "card-a")
    first, second = store.add_feedback(
        SERVICE, [dismissed("card-a", "data-incorrect"), dismissed("card-a", "already-addressed", "urn:other")], NOW, snooze_30_days
    )
    assert (first.reason_offered, first.snooze, second.reason_offered, second.snooze) == (True, None, False, None)
    assert store.list_snoozes() == []
    [row] = store.report()
    assert row.reasons_not_offered == 1


def test_a_later_reason_replaces_the_patients_snooze_and_lifting_is_guarded(store):
    issue_for_patient(store, "card-a")
    [old] = store.add_feedback(SERVICE, [dismissed("card-a", "already-addressed")], NOW, snooze_30_days)
    later = NOW + timedelta(hours=1)
    [new] = store.add_feedback(SERVICE, [dismissed("card-a", "already-addressed")], later, snooze_30_days)
    assert [s.set_at for s in store.list_snoozes()] == [later]
    assert store.lift_snooze(old.snooze) is False  # a stale copy cannot lift the newer snooze
    assert store.lift_snooze(new.snooze) is True
    assert store.list_snoozes() == []


def test_snoozes_are_listed_and_cleared_by_rule(store):
    issue_for_patient(store, "card-a")
    store.record_cards("hook-2", SERVICE, [IssuedCard("card-b", "r2", "info", (), ((REASON_SYSTEM, "already-addressed"),), "fp")], NOW, PATIENT)
    store.add_feedback(SERVICE, [dismissed("card-a", "already-addressed"), dismissed("card-b", "already-addressed")], NOW, snooze_30_days)
    assert [s.rule_id for s in store.list_snoozes()] == ["r1", "r2"]
    assert [s.rule_id for s in store.clear_snoozes(rule_id="r2")] == ["r2"]
    assert [s.rule_id for s in store.list_snoozes()] == ["r1"]


def test_a_card_issued_without_a_patient_key_never_snoozes(store):
    store.record_cards("hook-1", SERVICE, [IssuedCard("card-a", "r1", "warning", (), ((REASON_SYSTEM, "already-addressed"),), "fp")], NOW)
    [stored] = store.add_feedback(SERVICE, [dismissed("card-a", "already-addressed")], NOW, snooze_30_days)
    assert stored.snooze is None


def test_snooze_ends_on_expiry_rule_change_or_higher_indicator():
    snooze = Snooze(SERVICE, "r1", PATIENT, "already-addressed", "warning", "fp-1", "hook-1", NOW, NOW + timedelta(days=30))
    assert snooze.ends_because(NOW + timedelta(days=29), "fp-1", "warning") is None
    assert snooze.ends_because(NOW + timedelta(days=29), "fp-1", "info") is None
    assert snooze.ends_because(NOW + timedelta(days=30), "fp-1", "warning") == "expired"
    assert snooze.ends_because(NOW, "fp-2", "warning") == "rule changed"
    assert snooze.ends_because(NOW, "fp-1", "critical") == "higher indicator"


def test_withheld_cards_are_counted_per_rule_and_since(store):
    snooze = Snooze(SERVICE, "r1", PATIENT, "already-addressed", "warning", "fp-1", "hook-1", NOW, NOW + timedelta(days=30))
    store.record_withheld(SERVICE, "hook-2", [snooze], NOW)
    store.record_withheld(SERVICE, "hook-3", [snooze], NOW + timedelta(days=2))
    [row] = store.report()
    assert (row.rule_id, row.withheld, row.cards_issued) == ("r1", 2, 0)
    [row] = store.report(since=NOW + timedelta(days=1))
    assert row.withheld == 1


def test_a_version_1_database_is_upgraded_in_place(db_path):
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    from service.store import _MIGRATIONS

    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in _MIGRATIONS[1]:
        raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (1)")
    raw.execute("INSERT INTO issued_cards VALUES ('old', ?, 'h', 'r1', 'info', '[]', '2024-01-01T00:00:00.000000Z')", (SERVICE,))
    raw.commit()
    raw.close()
    with Store.from_url(url_for(db_path)) as store:
        [stored] = store.add_feedback(SERVICE, [dismissed("old", "already-addressed")], NOW, snooze_30_days)
        # An old card offered no reasons and names no patient: stored, flagged, never snoozing.
        assert (stored.known_card, stored.reason_offered, stored.snooze) == (True, False, None)
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 2
    raw.close()
