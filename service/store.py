"""Persistence of issued cards, feedback and seen JWT ids: SQLite by default, PostgreSQL optional."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    from service.cds_hooks.feedback import FeedbackItem

__all__ = [
    "IssuedCard",
    "RuleReport",
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "StoredFeedback",
    "UNKNOWN_CARD_ROW",
    "format_report",
]

SCHEMA_VERSION = 1

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
}

_INSERT_CARD = (
    "INSERT INTO issued_cards (card_uuid, service_id, hook_instance, rule_id, indicator,"
    " suggestion_uuids, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    # A retried hook call may re-record the same card; the first record wins.
    " ON CONFLICT (card_uuid) DO NOTHING"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (feedback_id, service_id, card_uuid, rule_id, known_card, outcome,"
    " accepted_suggestions, override_reason_code, override_reason_system, override_reason_display,"
    " has_user_comment, outcome_timestamp, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
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
        self, hook_instance: str, service_id: str, cards: list[IssuedCard], issued_at: datetime
    ) -> None:
        """Remember which rule produced each issued card, so later feedback can be attributed."""
        if not cards:
            return
        issued = _utc_text(issued_at)
        rows = [
            (card.uuid, service_id, hook_instance, card.rule_id, card.indicator,
             json.dumps(list(card.suggestion_uuids)), issued)
            for card in cards
        ]
        with self._write() as cursor:
            cursor.executemany(self._sql(_INSERT_CARD), rows)

    def add_feedback(
        self, service_id: str, items: list[FeedbackItem], received_at: datetime
    ) -> list[StoredFeedback]:
        """Store each item in its own row; feedback on cards we never issued is kept and flagged."""
        received = _utc_text(received_at)
        # Card lookups run before the write transaction, so the write lock is held for the inserts only.
        rule_by_card: dict[str, str | None] = {}
        with self._read() as cursor:
            for card in dict.fromkeys(item.card for item in items):
                # Matching on service_id too: a card from another service is not "known" here.
                cursor.execute(
                    self._sql("SELECT rule_id FROM issued_cards WHERE card_uuid = ? AND service_id = ?"),
                    (card, service_id),
                )
                row = cursor.fetchone()
                rule_by_card[card] = row[0] if row else None
        stored: list[StoredFeedback] = []
        rows = []
        for item in items:
            rule_id = rule_by_card[item.card]
            feedback_id = str(uuid.uuid4())
            rows.append((
                feedback_id, service_id, item.card, rule_id, int(rule_id is not None),
                item.outcome, json.dumps(list(item.accepted_suggestions)),
                item.override_reason_code, item.override_reason_system,
                item.override_reason_display, int(bool(item.user_comment)),
                _utc_text(item.outcome_timestamp), received,
            ))
            stored.append(
                StoredFeedback(
                    feedback_id=feedback_id,
                    card=item.card,
                    outcome=item.outcome,
                    rule_id=rule_id,
                    known_card=rule_id is not None,
                    outcome_timestamp=item.outcome_timestamp,
                    received_at=received_at,
                )
            )
        with self._write() as cursor:
            cursor.executemany(self._sql(_INSERT_FEEDBACK), rows)
        return stored

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

    def report(self, service_id: str | None = None) -> list[RuleReport]:
        """Per-rule counts of issued cards, accepted and overridden cards, and top override reasons."""
        where, params = ("", ()) if service_id is None else (" WHERE service_id = ?", (service_id,))
        overridden_where = " WHERE outcome = ?" + ("" if service_id is None else " AND service_id = ?")
        with self._read() as cursor:
            cursor.execute(
                self._sql(f"SELECT rule_id, COUNT(*) FROM issued_cards{where} GROUP BY rule_id"), params
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
                    " override_reason_display, has_user_comment, COUNT(*)"
                    f" FROM feedback{overridden_where}"
                    " GROUP BY known_card, rule_id, override_reason_system, override_reason_code,"
                    " override_reason_display, has_user_comment"
                ),
                ("overridden", *params),
            )
            reasons = cursor.fetchall()

        def row_key(known: int, rule_id: str | None) -> str | None:
            # None stands for the unknown-card pseudo-row; it cannot clash with a rule id.
            return rule_id if known else None

        counts: dict[str | None, dict[str, int]] = {rule: {} for rule in issued}
        for known, rule_id, outcome, events, cards in outcomes:
            bucket = counts.setdefault(row_key(known, rule_id), {})
            bucket[outcome] = cards
            bucket["events"] = bucket.get("events", 0) + events

        reason_counts: dict[str | None, Counter[tuple[str | None, ...]]] = {}
        labels: dict[tuple[str | None, ...], Counter[str]] = {}
        for known, rule_id, system, code, display, has_comment, events in reasons:
            if code:
                reason: tuple[str | None, ...] = ("code", system, code)
                label = display or code
            else:
                reason = ("comment",) if has_comment else ("none",)
                label = _COMMENT_ONLY if has_comment else _NO_REASON
            reason_counts.setdefault(row_key(known, rule_id), Counter())[reason] += events
            # One coded reason may arrive with differing displays; show the most frequent.
            labels.setdefault(reason, Counter())[label] += events

        def top_reasons(key: str | None) -> tuple[tuple[str, int], ...]:
            ranked = sorted(
                ((labels[reason].most_common(1)[0][0], n) for reason, n in reason_counts.get(key, {}).items()),
                key=lambda pair: (-pair[1], pair[0]),
            )
            return tuple(ranked[:_TOP_REASONS])

        rows = []
        for key in sorted((k for k in counts if k is not None)) + ([None] if None in counts else []):
            bucket = counts[key]
            rows.append(
                RuleReport(
                    rule_id=UNKNOWN_CARD_ROW if key is None else key,
                    cards_issued=issued.get(key, 0) if key is not None else 0,
                    accepted=bucket.get("accepted", 0),
                    overridden=bucket.get("overridden", 0),
                    feedback_events=bucket.get("events", 0),
                    top_override_reasons=top_reasons(key),
                    unknown_cards=key is None,
                )
            )
        return rows

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
    header = ("RULE", "ISSUED", "ACCEPTED", "OVERRIDDEN", "ACCEPT RATE", "TOP OVERRIDE REASONS")
    right_aligned = (False, True, True, True, True, False)
    table = [header]
    for row in rows:
        rate = f"{row.accepted / row.cards_issued:.0%}" if row.cards_issued else "-"
        reasons = ", ".join(f"{label} ({count})" for label, count in row.top_override_reasons) or "-"
        table.append(
            (row.rule_id, str(row.cards_issued), str(row.accepted), str(row.overridden), rate, reasons)
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
    return "\n".join(lines)
