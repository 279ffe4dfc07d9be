"""Persistence of issued cards, feedback, snoozes and seen JWT ids: SQLite by default, PostgreSQL optional.

Patients appear only as keyed hashes (`patient_key`): HMAC-SHA256 under CDS_PATIENT_KEY, so
the database alone cannot tell whose cards these were, nor be matched against a list of ids.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from service.cds_hooks.feedback import FeedbackItem

__all__ = [
    "INDICATOR_RANK",
    "IssuedCard",
    "Snooze",
    "patient_key",
    "RuleReport",
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "StoredFeedback",
    "UNKNOWN_CARD_ROW",
    "format_report",
]

SCHEMA_VERSION = 2
INDICATOR_RANK = {"info": 0, "warning": 1, "critical": 2}

# Label of the report pseudo-row that gathers feedback naming cards we never issued.
UNKNOWN_CARD_ROW = "(unknown card)"

_COMMENT_ONLY = "(comment only)"
_NO_REASON = "(no reason given)"
_TOP_REASONS = 3
# Expired jti rows are harmless (the upsert below reuses them), so pruning can be lazy.
_PRUNE_INTERVAL_SECONDS = 60.0
# Arbitrary constant shared by every process so PostgreSQL schema creation is serialised.
_PG_SCHEMA_LOCK_KEY = 0x0CA1C1


class StoreError(RuntimeError):
    """The store could not be opened, migrated or reached."""


@dataclass(frozen=True)
class IssuedCard:
    """A card as returned to a CDS client; identifiers only, no patient data."""

    uuid: str
    rule_id: str
    indicator: str
    suggestion_uuids: tuple[str, ...] = ()
    override_reasons: tuple[tuple[str, str], ...] = ()  # (system, code) offered on the card
    rule_fingerprint: str = ""  # the rule's snooze fingerprint when the card was issued


def patient_key(secret: bytes, patient_id: str, fhir_server: str | None = None) -> str:
    """Keyed hash naming a patient in the store; the FHIR server is part of who the patient is."""
    # Two EHRs may both have a Patient/123: hashing the server too keeps their snoozes apart.
    message = f"{(fhir_server or '').rstrip('/')}\n{patient_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Snooze:
    """One rule kept quiet for one patient on one service, after overridden feedback."""

    service_id: str
    rule_id: str
    patient_key: str
    reason: str
    indicator: str  # of the overridden card: a card with a higher one ends the snooze
    rule_fingerprint: str
    hook_instance: str  # of the call whose card was overridden
    set_at: datetime
    until: datetime

    def ends_because(self, now: datetime, rule_fingerprint: str, indicator: str) -> str | None:
        """Why this snooze no longer holds back a card with this indicator, or None if it does."""
        if now >= self.until:
            return "expired"
        if rule_fingerprint != self.rule_fingerprint:
            return "rule changed"
        if INDICATOR_RANK.get(indicator, 0) > INDICATOR_RANK.get(self.indicator, 0):
            return "higher indicator"
        return None


@dataclass(frozen=True)
class StoredFeedback:
    """One feedback item as persisted."""

    feedback_id: str
    card: str
    outcome: str
    rule_id: str | None
    known_card: bool
    outcome_timestamp: datetime
    received_at: datetime
    # None without a coded reason or for an unknown card; False: a reason the card did not offer.
    reason_offered: bool | None = None
    snooze: Snooze | None = None


@dataclass(frozen=True)
class RuleReport:
    """Feedback totals for one rule (or the unknown-card pseudo-row)."""

    rule_id: str
    cards_issued: int
    accepted: int
    overridden: int
    feedback_events: int
    top_override_reasons: tuple[tuple[str, int], ...]
    unknown_cards: bool = False
    override_reasons: tuple[tuple[str, int], ...] = ()  # every reason, most frequent first
    suggestions_taken: int = 0
    withheld: int = 0  # cards the rule raised but a snooze kept back
    reasons_not_offered: int = 0  # overridden feedback naming a reason the card did not offer


# Statements are written once with "?" placeholders and adapted per driver, so keep
# them free of "%" (psycopg's placeholder prefix) and of literal question marks.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS issued_cards (
            card_uuid TEXT PRIMARY KEY,
            service_id TEXT NOT NULL,
            hook_instance TEXT NOT NULL,
            rule_id TEXT NOT NULL,
            indicator TEXT NOT NULL,
            suggestion_uuids TEXT NOT NULL,
            issued_at TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS issued_cards_by_rule ON issued_cards (service_id, rule_id)",
        # Free-text userComment is reduced to a flag: clinicians type patient details into it.
        """CREATE TABLE IF NOT EXISTS feedback (
            feedback_id TEXT PRIMARY KEY,
            service_id TEXT NOT NULL,
            card_uuid TEXT NOT NULL,
            rule_id TEXT,
            known_card INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            accepted_suggestions TEXT NOT NULL,
            override_reason_code TEXT,
            override_reason_system TEXT,
            override_reason_display TEXT,
            has_user_comment INTEGER NOT NULL,
            outcome_timestamp TEXT NOT NULL,
            received_at TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS feedback_by_rule ON feedback (service_id, rule_id)",
        "CREATE INDEX IF NOT EXISTS feedback_by_card ON feedback (card_uuid)",
        # DOUBLE PRECISION, not REAL: PostgreSQL's REAL is float4 and would round epoch seconds.
        """CREATE TABLE IF NOT EXISTS seen_jti (
            iss TEXT NOT NULL,
            jti TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (iss, jti)
        )""",
        "CREATE INDEX IF NOT EXISTS seen_jti_by_expiry ON seen_jti (expires_at)",
    ),
    # Version 1 held no patient identity at all; snoozes need one, so it arrives here as a
    # keyed hash only. Cards issued before this version have no patient_key and never snooze.
    2: (
        "ALTER TABLE issued_cards ADD COLUMN patient_key TEXT",
        "ALTER TABLE issued_cards ADD COLUMN rule_fingerprint TEXT",
        "ALTER TABLE issued_cards ADD COLUMN override_reasons TEXT",
        "ALTER TABLE feedback ADD COLUMN reason_offered INTEGER",
        """CREATE TABLE IF NOT EXISTS snoozes (
            service_id TEXT NOT NULL,
            rule_id TEXT NOT NULL,
            patient_key TEXT NOT NULL,
            reason_code TEXT NOT NULL,
            indicator TEXT NOT NULL,
            rule_fingerprint TEXT NOT NULL,
            hook_instance TEXT NOT NULL,
            set_at TEXT NOT NULL,
            ends_at TEXT NOT NULL,
            PRIMARY KEY (service_id, rule_id, patient_key)
        )""",
        "CREATE INDEX IF NOT EXISTS snoozes_by_rule ON snoozes (rule_id)",
        """CREATE TABLE IF NOT EXISTS withheld_cards (
            service_id TEXT NOT NULL,
            rule_id TEXT NOT NULL,
            hook_instance TEXT NOT NULL,
            reason_code TEXT NOT NULL,
            withheld_at TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS withheld_by_rule ON withheld_cards (service_id, rule_id)",
    ),
}

_INSERT_CARD = (
    "INSERT INTO issued_cards (card_uuid, service_id, hook_instance, rule_id, indicator,"
    " suggestion_uuids, issued_at, patient_key, rule_fingerprint, override_reasons)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    # A retried hook call may re-record the same card; the first record wins.
    " ON CONFLICT (card_uuid) DO NOTHING"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, service_id, card_uuid, rule_id, known_card, outcome,"
    " accepted_suggestions, override_reason_code, override_reason_system, override_reason_display,"
    " has_user_comment, outcome_timestamp, received_at, reason_offered)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The latest overridden feedback decides: a new reason replaces the patient's earlier snooze.
_UPSERT_SNOOZE = (
    "INSERT INTO snoozes (service_id, rule_id, patient_key, reason_code, indicator, rule_fingerprint,"
    " hook_instance, set_at, ends_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (service_id, rule_id, patient_key) DO UPDATE SET reason_code = excluded.reason_code,"
    " indicator = excluded.indicator, rule_fingerprint = excluded.rule_fingerprint,"
    " hook_instance = excluded.hook_instance, set_at = excluded.set_at, ends_at = excluded.ends_at"
)
_SNOOZE_COLUMNS = (
    "service_id, rule_id, patient_key, reason_code, indicator, rule_fingerprint, hook_instance, set_at, ends_at"
)
# How many snoozes one `feedback snoozes list` prints at most.
SNOOZE_LIST_LIMIT = 10_000
# One atomic statement, so two processes racing on the same jti cannot both win.  A row
# whose expiry has passed is reclaimed rather than blocking the id forever before pruning.
_UPSERT_JTI = (
    "INSERT INTO seen_jti (iss, jti, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at"
    " WHERE seen_jti.expires_at < ?"
)


def _utc_text(ts: datetime) -> str:
    """Fixed-width UTC text, so timestamps sort and compare correctly as strings."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("timestamps must be timezone-aware; got a naive datetime")
    return ts.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _from_utc_text(text: str) -> datetime:
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=timezone.utc)


def _snooze(row: tuple) -> Snooze:
    service_id, rule_id, key, reason, indicator, fingerprint, hook_instance, set_at, until = row
    return Snooze(service_id, rule_id, key, reason, indicator, fingerprint, hook_instance,
                  _from_utc_text(set_at), _from_utc_text(until))


# rule id, reason code -> snooze length, or None when that reason does not snooze the rule.
SnoozePolicy = Callable[[str, str], "timedelta | None"]


class _SqliteBackend:
    """Embedded SQLite file opened in WAL mode."""

    placeholder = "?"

    def __init__(self, path: str):
        self.path = path

    def connect(self) -> Any:
        # isolation_level=None: we issue BEGIN ourselves, see write().
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            # journal_mode needs a lock to change; skip it when another process already did it.
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def is_broken(conn: Any) -> bool:
        """SQLite connections do not drop."""
        return False

    @contextmanager
    def write(self, conn: Any) -> Iterator[Any]:
        """Transaction holding the write lock from the start."""
        # IMMEDIATE: a deferred transaction that reads and then writes can fail with
        # SQLITE_BUSY without waiting when another process committed in between.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn.cursor()
        except BaseException:
            # SQLite rolls back by itself on some errors (e.g. disk full); a second ROLLBACK would mask them.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self, conn: Any) -> Iterator[Any]:
        """Read transaction, so multi-query reports see one snapshot."""
        conn.execute("BEGIN")
        try:
            yield conn.cursor()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def lock_schema(self, cursor: Any) -> None:
        """BEGIN IMMEDIATE already serialises schema creation."""


class _PostgresBackend:
    """PostgreSQL through psycopg 3."""

    placeholder = "%s"

    def __init__(self, psycopg: Any, url: str):
        self._psycopg = psycopg
        self._url = url

    def connect(self) -> Any:
        # autocommit so idle connections hold no transaction; write()/read() open one explicitly.
        return self._psycopg.connect(self._url, autocommit=True)

    @staticmethod
    def is_broken(conn: Any) -> bool:
        """A dropped server connection must be replaced, not reused."""
        return bool(conn.closed or conn.broken)

    @contextmanager
    def write(self, conn: Any) -> Iterator[Any]:
        """Transaction committed on success, rolled back on error."""
        with conn.transaction(), conn.cursor() as cursor:
            yield cursor

    read = write

    def lock_schema(self, cursor: Any) -> None:
        """Concurrent CREATE TABLE IF NOT EXISTS can still collide in PostgreSQL's catalog."""
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK_KEY,))


class Store:
    """Cards, feedback and seen JWT ids, shared safely by threads and worker processes."""

    def __init__(self, backend: _SqliteBackend | _PostgresBackend):
        self._backend = backend
        self._local = threading.local()
        self._registry_lock = threading.Lock()
        # (pid, connection) so close() never touches connections inherited across fork.
        self._connections: list[tuple[int, Any]] = []
        self._closed = False
        self._next_prune = 0.0
        self._migrate()

    @classmethod
    def from_url(cls, url: str) -> Store:
        """Open sqlite:///relative.db, sqlite:////absolute.db or postgresql://user@host/db."""
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///"):]
            if not path or path == ":memory:":
                # Per-thread connections to :memory: would each see a different, empty database.
                raise StoreError("sqlite store needs a file path, e.g. sqlite:///var/feedback.db")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return cls(_SqliteBackend(path))
        scheme, _, rest = url.partition("://")
        scheme = scheme.lower()
        if scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+"):
            try:
                import psycopg  # noqa: PLC0415 - optional dependency, imported only when asked for
            except ImportError:
                raise StoreError(
                    "a postgresql:// store URL needs psycopg 3: pip install 'calcinosis-cds[postgres]'"
                ) from None
            # Accept SQLAlchemy-style postgresql+psycopg:// too; libpq knows only postgresql://.
            return cls(_PostgresBackend(psycopg, "postgresql://" + rest))
        # Only the scheme is echoed: the rest of the URL may carry a password.
        raise StoreError(
            f"unsupported store URL scheme {scheme!r}; use sqlite:///path/to/file.db or postgresql://..."
        )

    def _sql(self, statement: str) -> str:
        """Adapt a '?'-placeholder statement to the driver's placeholder style."""
        return statement.replace("?", self._backend.placeholder)

    def _connection(self) -> Any:
        """This thread's connection, opened on first use in this thread and process."""
        if self._closed:
            raise StoreError("store is closed")
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == pid:
            if not self._backend.is_broken(conn):
                return conn
            self._forget(conn)
        # A connection inherited through fork (e.g. gunicorn --preload) must not be
        # used by the child; it is simply dropped and a fresh one opened.
        conn = self._backend.connect()
        self._local.conn = conn
        self._local.pid = pid
        with self._registry_lock:
            self._connections.append((pid, conn))
        return conn

    def _forget(self, conn: Any) -> None:
        """Close and unregister a connection."""
        with self._registry_lock:
            self._connections = [(p, c) for p, c in self._connections if c is not conn]
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - it is already unusable; nothing to report
            pass

    @contextmanager
    def _write(self) -> Iterator[Any]:
        with self._backend.write(self._connection()) as cursor:
            yield cursor

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._backend.read(self._connection()) as cursor:
            yield cursor

    def _migrate(self) -> None:
        """Create or upgrade the schema, recording each applied version."""
        with self._write() as cursor:
            self._backend.lock_schema(cursor)
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cursor.execute("SELECT MAX(version) FROM schema_version")
            current = cursor.fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema version {current} is newer than this service supports "
                    f"({SCHEMA_VERSION}); upgrade calcinosis-cds"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    cursor.execute(self._sql(statement))
                cursor.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (version,))

    def record_cards(
        self, hook_instance: str, service_id: str, cards: list[IssuedCard], issued_at: datetime,
        patient_key: str | None = None,
    ) -> None:
        """Remember which rule produced each issued card, and for whom (a keyed hash), for feedback."""
        if not cards:
            return
        issued = _utc_text(issued_at)
        rows = [
            (card.uuid, service_id, hook_instance, card.rule_id, card.indicator,
             json.dumps(list(card.suggestion_uuids)), issued, patient_key, card.rule_fingerprint,
             json.dumps([list(reason) for reason in card.override_reasons]))
            for card in cards
        ]
        with self._write() as cursor:
            cursor.executemany(self._sql(_INSERT_CARD), rows)

    def add_feedback(
        self, service_id: str, items: list[FeedbackItem], received_at: datetime,
        snooze_policy: SnoozePolicy | None = None,
    ) -> list[StoredFeedback]:
        """Store each item in its own row; feedback on cards we never issued is kept and flagged.

        An overridden item whose reason the card offered and `snooze_policy` snoozes sets (or
        replaces) that rule's snooze for the card's patient, in the same transaction.
        """
        received = _utc_text(received_at)
        # Card lookups run before the write transaction, so the write lock is held for the inserts only.
        cards: dict[str, tuple | None] = {}
        with self._read() as cursor:
            for card in dict.fromkeys(item.card for item in items):
                # Matching on service_id too: a card from another service is not "known" here.
                cursor.execute(
                    self._sql(
                        "SELECT rule_id, patient_key, rule_fingerprint, override_reasons, indicator, hook_instance"
                        " FROM issued_cards WHERE card_uuid = ? AND service_id = ?"
                    ),
                    (card, service_id),
                )
                cards[card] = cursor.fetchone()
        stored: list[StoredFeedback] = []
        rows = []
        snoozes: dict[tuple[str, str], Snooze] = {}  # the last item for a rule and patient decides
        for item in items:
            issued = cards[item.card]
            rule_id = issued[0] if issued else None
            offered = None
            if issued is not None and item.override_reason_code:
                reasons = {tuple(pair) for pair in json.loads(issued[3] or "[]")}
                offered = (item.override_reason_system, item.override_reason_code) in reasons
            feedback_id = str(uuid.uuid4())
            rows.append((
                feedback_id, service_id, item.card, rule_id, int(rule_id is not None),
                item.outcome, json.dumps(list(item.accepted_suggestions)),
                item.override_reason_code, item.override_reason_system,
                item.override_reason_display, int(bool(item.user_comment)),
                _utc_text(item.outcome_timestamp), received,
                None if offered is None else int(offered),
            ))
            snooze = None
            if item.outcome == "overridden" and offered and issued[1] and snooze_policy is not None:
                length = snooze_policy(rule_id, item.override_reason_code)
                if length is not None:
                    snooze = Snooze(service_id, rule_id, issued[1], item.override_reason_code, issued[4],
                                    issued[2] or "", issued[5], received_at, received_at + length)
                    snoozes[(rule_id, issued[1])] = snooze
            stored.append(
                StoredFeedback(
                    feedback_id=feedback_id,
                    card=item.card,
                    outcome=item.outcome,
                    rule_id=rule_id,
                    known_card=rule_id is not None,
                    outcome_timestamp=item.outcome_timestamp,
                    received_at=received_at,
                    reason_offered=offered,
                    snooze=snooze,
                )
            )
        with self._write() as cursor:
            cursor.executemany(self._sql(_INSERT_FEEDBACK), rows)
            if snoozes:
                cursor.executemany(self._sql(_UPSERT_SNOOZE), [
                    (service_id, s.rule_id, s.patient_key, s.reason, s.indicator, s.rule_fingerprint,
                     s.hook_instance, received, _utc_text(s.until))
                    for s in snoozes.values()
                ])
        return stored

    # --- snoozes ---------------------------------------------------------------------------------

    def snoozes_for(self, service_id: str, patient_key: str, rule_ids: Iterable[str]) -> dict[str, Snooze]:
        """The stored snoozes of these rules for one patient on one service (expired ones too)."""
        wanted = sorted(set(rule_ids))
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        with self._read() as cursor:
            cursor.execute(
                self._sql(
                    f"SELECT {_SNOOZE_COLUMNS} FROM snoozes"
                    f" WHERE service_id = ? AND patient_key = ? AND rule_id IN ({marks})"
                ),
                (service_id, patient_key, *wanted),
            )
            return {row[1]: _snooze(row) for row in cursor.fetchall()}

    def lift_snooze(self, snooze: Snooze) -> bool:
        """Delete this snooze unless feedback has replaced it meanwhile; True if it was deleted."""
        with self._write() as cursor:
            cursor.execute(
                self._sql(
                    "DELETE FROM snoozes WHERE service_id = ? AND rule_id = ? AND patient_key = ? AND set_at = ?"
                ),
                (snooze.service_id, snooze.rule_id, snooze.patient_key, _utc_text(snooze.set_at)),
            )
            return cursor.rowcount == 1

    def record_withheld(self, service_id: str, hook_instance: str, snoozes: list[Snooze], at: datetime) -> None:
        """Count cards a snooze kept back (rule and reason only), for the feedback report."""
        if not snoozes:
            return
        rows = [(service_id, s.rule_id, hook_instance, s.reason, _utc_text(at)) for s in snoozes]
        with self._write() as cursor:
            cursor.executemany(
                self._sql(
                    "INSERT INTO withheld_cards (service_id, rule_id, hook_instance, reason_code, withheld_at)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                rows,
            )

    def list_snoozes(self, rule_id: str | None = None, service_id: str | None = None) -> list[Snooze]:
        """Stored snoozes, soonest to end first, at most SNOOZE_LIST_LIMIT of them."""
        where, params = self._snooze_filter(rule_id, service_id)
        with self._read() as cursor:
            cursor.execute(
                self._sql(f"SELECT {_SNOOZE_COLUMNS} FROM snoozes{where} ORDER BY ends_at, rule_id LIMIT ?"),
                (*params, SNOOZE_LIST_LIMIT),
            )
            return [_snooze(row) for row in cursor.fetchall()]

    def clear_snoozes(self, rule_id: str | None = None, service_id: str | None = None) -> list[Snooze]:
        """Delete snoozes (all, or one rule's, or one service's) and return what was deleted."""
        where, params = self._snooze_filter(rule_id, service_id)
        with self._write() as cursor:
            cursor.execute(self._sql(f"SELECT {_SNOOZE_COLUMNS} FROM snoozes{where}"), params)
            cleared = [_snooze(row) for row in cursor.fetchall()]
            cursor.execute(self._sql(f"DELETE FROM snoozes{where}"), params)
        return cleared

    @staticmethod
    def _snooze_filter(rule_id: str | None, service_id: str | None) -> tuple[str, tuple]:
        clauses = [(c, v) for c, v in (("rule_id = ?", rule_id), ("service_id = ?", service_id)) if v is not None]
        where = (" WHERE " + " AND ".join(c for c, _ in clauses)) if clauses else ""
        return where, tuple(v for _, v in clauses)

    def check_and_store_jti(self, iss: str, jti: str, expires_at: float) -> bool:
        """Record a JWT id; True the first time it is seen, False for a replay."""
        now = time.time()
        with self._write() as cursor:
            cursor.execute(self._sql(_UPSERT_JTI), (iss, jti, float(expires_at), now))
            first_use = cursor.rowcount == 1
            if now >= self._next_prune:
                self._next_prune = now + _PRUNE_INTERVAL_SECONDS
                cursor.execute(self._sql("DELETE FROM seen_jti WHERE expires_at < ?"), (now,))
        return first_use

    def report(self, service_id: str | None = None, since: datetime | None = None) -> list[RuleReport]:
        """Per rule: cards issued, accepted, overridden (by reason), suggestions taken, cards withheld.

        `since` counts cards issued, feedback received and cards withheld from that moment on.
        """
        def scope(time_column: str) -> tuple[str, tuple]:
            clauses, params = [], []
            if service_id is not None:
                clauses.append("service_id = ?")
                params.append(service_id)
            if since is not None:
                clauses.append(f"{time_column} >= ?")
                params.append(_utc_text(since))
            return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)

        cards_where, cards_params = scope("issued_at")
        where, params = scope("received_at")
        overridden_where = (where + " AND" if where else " WHERE") + " outcome = ?"
        withheld_where, withheld_params = scope("withheld_at")
        with self._read() as cursor:
            cursor.execute(
                self._sql(f"SELECT rule_id, COUNT(*) FROM issued_cards{cards_where} GROUP BY rule_id"), cards_params
            )
            issued = {rule: count for rule, count in cursor.fetchall()}
            # Distinct cards per outcome: a client may send the same feedback more than once.
            cursor.execute(
                self._sql(
                    "SELECT known_card, rule_id, outcome, COUNT(*), COUNT(DISTINCT card_uuid)"
                    f" FROM feedback{where} GROUP BY known_card, rule_id, outcome"
                ),
                params,
            )
            outcomes = cursor.fetchall()
            cursor.execute(
                self._sql(
                    "SELECT known_card, rule_id, override_reason_system, override_reason_code,"
                    " override_reason_display, has_user_comment, reason_offered, COUNT(*)"
                    f" FROM feedback{overridden_where}"
                    " GROUP BY known_card, rule_id, override_reason_system, override_reason_code,"
                    " override_reason_display, has_user_comment, reason_offered"
                ),
                (*params, "overridden"),
            )
            reasons = cursor.fetchall()
            cursor.execute(
                self._sql(
                    "SELECT DISTINCT known_card, rule_id, card_uuid, accepted_suggestions"
                    f" FROM feedback{(where + ' AND' if where else ' WHERE')} outcome = ?"
                ),
                (*params, "accepted"),
            )
            taken_rows = cursor.fetchall()
            cursor.execute(
                self._sql(f"SELECT rule_id, COUNT(*) FROM withheld_cards{withheld_where} GROUP BY rule_id"),
                withheld_params,
            )
            withheld = {rule: count for rule, count in cursor.fetchall()}

        def row_key(known: int, rule_id: str | None) -> str | None:
            # None stands for the unknown-card pseudo-row; it cannot clash with a rule id.
            return rule_id if known else None

        counts: dict[str | None, dict[str, int]] = {rule: {} for rule in (*issued, *withheld)}
        for known, rule_id, outcome, events, cards in outcomes:
            bucket = counts.setdefault(row_key(known, rule_id), {})
            bucket[outcome] = cards
            bucket["events"] = bucket.get("events", 0) + events

        # Each distinct suggestion accepted on each card counts once, however often it was reported.
        taken: dict[str | None, set[tuple[str, str]]] = {}
        for known, rule_id, card, suggestions in taken_rows:
            taken.setdefault(row_key(known, rule_id), set()).update((card, s) for s in json.loads(suggestions))

        reason_counts: dict[str | None, Counter[tuple[str | None, ...]]] = {}
        labels: dict[tuple[str | None, ...], Counter[str]] = {}
        not_offered: Counter[str | None] = Counter()
        for known, rule_id, system, code, display, has_comment, offered, events in reasons:
            if code:
                reason: tuple[str | None, ...] = ("code", system, code)
                label = display or code
            else:
                reason = ("comment",) if has_comment else ("none",)
                label = _COMMENT_ONLY if has_comment else _NO_REASON
            reason_counts.setdefault(row_key(known, rule_id), Counter())[reason] += events
            # One coded reason may arrive with differing displays; show the most frequent.
            labels.setdefault(reason, Counter())[label] += events
            if offered == 0:
                not_offered[row_key(known, rule_id)] += events

        def ranked_reasons(key: str | None) -> tuple[tuple[str, int], ...]:
            return tuple(sorted(
                ((labels[reason].most_common(1)[0][0], n) for reason, n in reason_counts.get(key, {}).items()),
                key=lambda pair: (-pair[1], pair[0]),
            ))

        rows = []
        for key in sorted((k for k in counts if k is not None)) + ([None] if None in counts else []):
            bucket = counts[key]
            ranked = ranked_reasons(key)
            rows.append(
                RuleReport(
                    rule_id=UNKNOWN_CARD_ROW if key is None else key,
                    cards_issued=issued.get(key, 0) if key is not None else 0,
                    accepted=bucket.get("accepted", 0),
                    overridden=bucket.get("overridden", 0),
                    feedback_events=bucket.get("events", 0),
                    top_override_reasons=ranked[:_TOP_REASONS],
                    unknown_cards=key is None,
                    override_reasons=ranked,
                    suggestions_taken=len(taken.get(key, ())),
                    withheld=withheld.get(key, 0) if key is not None else 0,
                    reasons_not_offered=not_offered.get(key, 0),
                )
            )
        return rows

    def timeline(self, service_id: str | None = None, since: datetime | None = None) -> dict[str, list[tuple[str, int, int, int]]]:
        """Per rule and UTC day: (day, cards issued, cards accepted, cards overridden), days in order."""
        clauses, params = [], []
        if service_id is not None:
            clauses.append("service_id = ?")
            params.append(service_id)
        since_text = _utc_text(since) if since is not None else None
        with self._read() as cursor:
            where = " AND ".join(clauses + (["issued_at >= ?"] if since_text else []))
            cursor.execute(
                self._sql(
                    "SELECT rule_id, SUBSTR(issued_at, 1, 10) AS day, COUNT(*) FROM issued_cards"
                    f"{' WHERE ' + where if where else ''} GROUP BY rule_id, SUBSTR(issued_at, 1, 10)"
                ),
                (*params, *([since_text] if since_text else [])),
            )
            issued = cursor.fetchall()
            where = " AND ".join(clauses + ["known_card = 1"] + (["received_at >= ?"] if since_text else []))
            cursor.execute(
                self._sql(
                    "SELECT rule_id, SUBSTR(received_at, 1, 10), outcome, COUNT(DISTINCT card_uuid) FROM feedback"
                    f" WHERE {where} GROUP BY rule_id, SUBSTR(received_at, 1, 10), outcome"
                ),
                (*params, *([since_text] if since_text else [])),
            )
            outcomes = cursor.fetchall()
        days: dict[str, dict[str, list[int]]] = {}
        for rule_id, day, count in issued:
            days.setdefault(rule_id, {}).setdefault(day, [0, 0, 0])[0] += count
        for rule_id, day, outcome, count in outcomes:
            slot = days.setdefault(rule_id, {}).setdefault(day, [0, 0, 0])
            slot[1 if outcome == "accepted" else 2] += count
        return {
            rule_id: [(day, *by_day[day]) for day in sorted(by_day)]  # type: ignore[misc]
            for rule_id, by_day in sorted(days.items())
        }

    def ping(self) -> None:
        """Raise StoreError unless the database answers a trivial query."""
        try:
            with self._read() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"store unreachable: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Close every connection this process opened; the store cannot be used afterwards."""
        self._closed = True
        pid = os.getpid()
        with self._registry_lock:
            mine = [conn for owner, conn in self._connections if owner == pid]
            self._connections = []
        for conn in mine:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing is best effort at shutdown
                pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def format_report(rows: Iterable[RuleReport]) -> str:
    """Render report rows as an aligned plain-text table."""
    rows = list(rows)
    header = ("RULE", "ISSUED", "ACCEPTED", "OVERRIDDEN", "ACCEPT RATE", "SUGGESTIONS TAKEN", "WITHHELD",
              "OVERRIDE REASONS")
    right_aligned = (False, True, True, True, True, True, True, False)
    table = [header]
    for row in rows:
        rate = f"{row.accepted / row.cards_issued:.0%}" if row.cards_issued else "-"
        reasons = ", ".join(f"{label} ({count})" for label, count in row.override_reasons or row.top_override_reasons) or "-"
        table.append(
            (row.rule_id, str(row.cards_issued), str(row.accepted), str(row.overridden), rate,
             str(row.suggestions_taken), str(row.withheld), reasons)
        )
    widths = [max(len(line[col]) for line in table) for col in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, right_aligned)
        ]
        return "  ".join(cells).rstrip()

    lines = [render(header), "  ".join("-" * width for width in widths)]
    lines.extend(render(line) for line in table[1:])
    if len(table) == 1:
        lines.append("(no cards issued and no feedback received)")
    flagged = [(row.rule_id, row.reasons_not_offered) for row in rows if row.reasons_not_offered]
    if flagged:
        lines.append("")
        lines += [f"{rule}: {n} override(s) gave a reason the card did not offer" for rule, n in flagged]
    if rows:
        lines += ["", "WITHHELD: cards the rule raised that a snooze kept back (not counted as issued)."]
    return "\n".join(lines)
