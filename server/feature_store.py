"""Where the front end reads users' profiles and histories, and appends their events.

:class:`FeatureStore` is the interface, with two implementations that :func:`open_store`
picks by the setting's form: a ``redis://`` URL selects
:class:`server.redis_store.RedisFeatureStore`, which a fleet of front ends shares; a path
selects :class:`SQLiteFeatureStore`, the embedded default, a real database file in WAL mode:

* ``append`` commits (``synchronous=FULL``) before it returns, so an acknowledged event
  survives ``kill -9`` of the server and a power cut;
* readers never block the writer nor each other (WAL), and each thread has its own
  connection, so the asyncio server can call the store from a thread pool;
* a user's reads are index range scans: the last ``n`` events, the last ``n`` positive
  events, or the whole history (for the lifelong pathway, which the caller caches by
  :meth:`FeatureStore.version`).

Events hold the item's string id and, for speed, its model index (``n_items`` for items
the model never saw, which the encoder reads as the unknown item). A store that cannot be
reached raises :class:`StoreUnavailable`: the front end then answers from a fallback and
never acknowledges events it did not store.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

import numpy as np

from onerec.runtime.lifelong import LifelongRecord
from onerec.runtime.pathways import FLAG_COLUMNS, History

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
  user_id TEXT PRIMARY KEY,
  static BLOB NOT NULL               -- int64 profile codes
);
CREATE TABLE IF NOT EXISTS events (
  user_id TEXT NOT NULL,
  ts INTEGER NOT NULL,               -- ms since the epoch
  item_id TEXT NOT NULL,
  item_idx INTEGER NOT NULL,         -- model index; n_items = unknown to the model
  watch_ms INTEGER NOT NULL,
  duration_ms INTEGER NOT NULL,
  flags INTEGER NOT NULL,            -- bit i = FLAG_COLUMNS[i]
  positive INTEGER NOT NULL          -- onerec.runtime.engagement.is_positive
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, ts);
CREATE INDEX IF NOT EXISTS positives_by_user ON events (user_id, positive, ts);
CREATE INDEX IF NOT EXISTS appends_by_user ON events (user_id);  -- (user_id, rowid) order
CREATE TABLE IF NOT EXISTS applied (  -- LogEvents request ids already committed
  user_id TEXT NOT NULL,
  request_id TEXT NOT NULL,
  accepted INTEGER NOT NULL,
  PRIMARY KEY (user_id, request_id)
);
CREATE TABLE IF NOT EXISTS versions (
  user_id TEXT PRIMARY KEY,
  n_events INTEGER NOT NULL          -- grows with every append: the cache key
);
CREATE TABLE IF NOT EXISTS lifelong (  -- onerec.runtime.lifelong.LifelongRecord
  user_id TEXT PRIMARY KEY,
  version INTEGER NOT NULL,          -- the events it covers: never replaced by an older one
  record BLOB NOT NULL
);
"""
_COLUMNS = "item_idx, ts, watch_ms, duration_ms, flags"
FLAG_BITS = 1 << np.arange(len(FLAG_COLUMNS))


class StoreUnavailable(Exception):
    """The store did not answer (down, unreachable, or replicas did not acknowledge)."""


@dataclass(frozen=True)
class EventRow:
    """One event as the store keeps it."""

    item_id: str
    item_idx: int
    timestamp_ms: int
    watch_ms: int
    duration_ms: int
    flags: tuple[bool, ...]  # FLAG_COLUMNS order
    positive: bool


class FeatureStore(Protocol):
    # Whether a read may wait on the network: the front end then reads from a worker
    # thread rather than on its event loop.
    reads_wait: bool

    def ping(self) -> None:
        """Raises :class:`StoreUnavailable` unless the store answers now."""
        ...

    def static(self, user_id: str) -> np.ndarray | None:
        """The user's profile codes, or None for a user the store has never seen."""
        ...

    def version(self, user_id: str) -> int:
        """Events stored for the user; changes whenever events are appended."""
        ...

    def recent(self, user_id: str, n: int, positive_only: bool = False) -> History:
        """The last ``n`` events (optionally only positive ones), in time order."""
        ...

    def history(self, user_id: str) -> History:
        """Every event, in time order."""
        ...

    def mark(self, user_id: str) -> int:
        """A position in the user's append order: events appended later come after it."""
        ...

    def items_after(self, user_id: str, mark: int) -> tuple[np.ndarray, int]:
        """Model indices of the events appended after ``mark``, and the new mark."""
        ...

    def any_user(self) -> str | None:
        """Some user with a profile (for examples)."""
        ...

    def items_outside(self, user_id: str, n_items: int) -> list[str]:
        """Distinct ids of the user's items whose model index is ``n_items`` or more."""
        ...

    def lifelong(self, user_id: str) -> LifelongRecord | None:
        """The user's stored lifelong record, or None."""
        ...

    def lifelong_version(self, user_id: str) -> int | None:
        """The events the stored lifelong record covers (without reading the record), or
        None where there is none."""
        ...

    def put_lifelong(self, user_id: str, record: LifelongRecord) -> None:
        """Store ``record`` unless the stored one already covers more events (two front
        ends may refresh one user at once)."""
        ...

    def append(self, user_id: str, events: Iterable[EventRow], request_id: str = "") -> int:
        """Durably append; returns the number of events committed. A retried call with
        the same non-empty ``request_id`` commits nothing and returns the first count."""
        ...

    def close(self) -> None: ...


P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_error(method: Callable[P, R]) -> Callable[P, R]:
    """SQLite errors that say the file cannot serve now (locked past the timeout, disk
    full or failing, not a database) raise :class:`StoreUnavailable`, as Redis's do, so
    the front end falls back instead of failing the call. Misuse errors pass through."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.DatabaseError as e:  # OperationalError included
            raise StoreUnavailable(f"sqlite {args[0].path}: {e}") from e

    return wrapper


def _history(rows: list[tuple]) -> History:
    a = np.array(rows, dtype=np.int64).reshape(len(rows), 5)
    flags = ((a[:, 4:5] & FLAG_BITS) > 0).astype(np.int8)
    return History(a[:, 0], a[:, 1], a[:, 2], a[:, 3], flags)


class SQLiteFeatureStore:
    """The :class:`FeatureStore` in one SQLite file (WAL)."""

    reads_wait = False  # a local file, and in WAL mode readers never wait on the writer

    def __init__(self, path: str | Path, timeout_s: float = 30.0) -> None:
        self.path, self.timeout_s = str(path), timeout_s  # how long a write waits for the lock
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    @_unavailable_on_error
    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()

    @_unavailable_on_error
    def static(self, user_id: str) -> np.ndarray | None:
        sql = "SELECT static FROM users WHERE user_id=?"
        row = self._conn().execute(sql, (user_id,)).fetchone()
        return None if row is None else np.frombuffer(row[0], np.int64).copy()

    @_unavailable_on_error
    def version(self, user_id: str) -> int:
        row = (
            self._conn()
            .execute("SELECT n_events FROM versions WHERE user_id=?", (user_id,))
            .fetchone()
        )
        return 0 if row is None else int(row[0])

    @_unavailable_on_error
    def recent(self, user_id: str, n: int, positive_only: bool = False) -> History:
        where = "user_id=? AND positive=1" if positive_only else "user_id=?"
        rows = (
            self._conn()
            .execute(
                f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY ts DESC, rowid DESC LIMIT ?",
                (user_id, n),
            )
            .fetchall()
        )
        return _history(rows[::-1])

    @_unavailable_on_error
    def history(self, user_id: str) -> History:
        rows = (
            self._conn()
            .execute(
                f"SELECT {_COLUMNS} FROM events WHERE user_id=? ORDER BY ts, rowid", (user_id,)
            )
            .fetchall()
        )
        return _history(rows)

    @_unavailable_on_error
    def mark(self, user_id: str) -> int:
        sql = "SELECT max(rowid) FROM events WHERE user_id=?"
        row = self._conn().execute(sql, (user_id,)).fetchone()
        return int(row[0] or 0)

    @_unavailable_on_error
    def items_after(self, user_id: str, mark: int) -> tuple[np.ndarray, int]:
        sql = "SELECT item_idx, rowid FROM events WHERE user_id=? AND rowid>? ORDER BY rowid"
        rows = self._conn().execute(sql, (user_id, mark)).fetchall()
        a = np.array(rows, np.int64).reshape(len(rows), 2)
        return a[:, 0], int(a[-1, 1]) if len(a) else mark

    @_unavailable_on_error
    def any_user(self) -> str | None:
        """Some user with a profile (for examples)."""
        row = self._conn().execute("SELECT user_id FROM users LIMIT 1").fetchone()
        return None if row is None else row[0]

    @_unavailable_on_error
    def items_outside(self, user_id: str, n_items: int) -> list[str]:
        rows = (
            self._conn()
            .execute(
                "SELECT DISTINCT item_id FROM events WHERE user_id=? AND item_idx>=?",
                (user_id, n_items),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    @_unavailable_on_error
    def lifelong(self, user_id: str) -> LifelongRecord | None:
        sql = "SELECT record FROM lifelong WHERE user_id=?"
        row = self._conn().execute(sql, (user_id,)).fetchone()
        return None if row is None else LifelongRecord.from_bytes(row[0])

    @_unavailable_on_error
    def lifelong_version(self, user_id: str) -> int | None:
        sql = "SELECT version FROM lifelong WHERE user_id=?"
        row = self._conn().execute(sql, (user_id,)).fetchone()
        return None if row is None else int(row[0])

    @_unavailable_on_error
    def put_lifelong(self, user_id: str, record: LifelongRecord) -> None:
        self._conn().execute(
            "INSERT INTO lifelong VALUES (?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET "
            "version = excluded.version, record = excluded.record "
            "WHERE excluded.version >= lifelong.version",
            (user_id, record.version, record.to_bytes()),
        )

    @_unavailable_on_error
    def append(self, user_id: str, events: Iterable[EventRow], request_id: str = "") -> int:
        rows = [
            (
                user_id,
                e.timestamp_ms,
                e.item_id,
                e.item_idx,
                e.watch_ms,
                e.duration_ms,
                int(np.dot(np.asarray(e.flags, np.int64), FLAG_BITS)),
                int(e.positive),
            )
            for e in events
        ]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if request_id:
                done = conn.execute(
                    "SELECT accepted FROM applied WHERE user_id=? AND request_id=?",
                    (user_id, request_id),
                ).fetchone()
                if done is not None:  # a retry of a call that committed
                    conn.execute("ROLLBACK")
                    return int(done[0])
                conn.execute(
                    "INSERT INTO applied VALUES (?, ?, ?)", (user_id, request_id, len(rows))
                )
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute(
                "INSERT INTO versions VALUES (?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET n_events = n_events + excluded.n_events",
                (user_id, len(rows)),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                conn.execute("ROLLBACK")
            raise
        return len(rows)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


@dataclass(frozen=True)
class BulkRows:
    """Every profile and event a store starts with (the build's data set), as arrays: what
    a bulk load writes. Events are in the log's row order."""

    static: np.ndarray  # (U, F) int64 profile codes
    user_ids: list[str]  # (U,) the profiles' users
    # events, in the log's order
    event_user: np.ndarray  # str
    item_id: np.ndarray  # str
    item_idx: np.ndarray
    ts: np.ndarray
    watch_ms: np.ndarray
    duration_ms: np.ndarray
    flags: np.ndarray  # bit i = FLAG_COLUMNS[i]
    positive: np.ndarray  # bool
    # each profiled user's lifelong record (its mark is set by the store that writes it)
    lifelong: list[LifelongRecord | None]


def write_sqlite(path: str | Path, rows: BulkRows) -> None:
    """A new store at ``path`` holding ``rows``, built aside and renamed into place."""
    path = Path(path)
    tmp = path.with_suffix(".building")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    store = SQLiteFeatureStore(tmp)
    conn = store._conn()
    ev = rows
    conn.execute("PRAGMA synchronous=OFF")  # a half-built file is never renamed into place
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO users VALUES (?, ?)",
        ((u, rows.static[i].tobytes()) for i, u in enumerate(rows.user_ids)),
    )
    conn.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        zip(
            ev.event_user.tolist(),
            ev.ts.tolist(),
            ev.item_id.tolist(),
            ev.item_idx.tolist(),
            ev.watch_ms.tolist(),
            ev.duration_ms.tolist(),
            ev.flags.tolist(),
            ev.positive.astype(int).tolist(),
            strict=True,
        ),
    )
    users, counts = np.unique(ev.event_user, return_counts=True)
    conn.executemany(
        "INSERT INTO versions VALUES (?, ?)", zip(users.tolist(), counts.tolist(), strict=True)
    )
    # Rows went in in log order into an empty table: a user's mark is its last row's id.
    last = dict(zip(ev.event_user.tolist(), range(1, len(ev.event_user) + 1), strict=True))
    conn.executemany(
        "INSERT INTO lifelong VALUES (?, ?, ?)",
        (
            (u, r.version, replace(r, mark=last[u]).to_bytes())
            for u, r in zip(rows.user_ids, rows.lifelong, strict=True)
            if r is not None
        ),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    tmp.rename(path)


def stored_users(spec: str | Path) -> int:
    """Profiles in the store ``spec`` names; 0 for a missing, empty or foreign SQLite file,
    which a build must replace rather than serve from."""
    from server.redis_store import is_redis_url

    if is_redis_url(str(spec)):
        store = open_store(spec)
        try:
            return store.stored_users()
        finally:
            store.close()
    uri = f"{Path(spec).absolute().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])
    except sqlite3.Error:
        return 0


def open_store(spec: str | Path) -> FeatureStore:
    """The store a setting names: a ``redis://`` URL (password from
    ``ONEREC_REDIS_PASSWORD``, replica acknowledgements from ``ONEREC_REDIS_WAIT_REPLICAS``
    and ``ONEREC_REDIS_WAIT_TIMEOUT_MS``) or the path of a SQLite file."""
    from server.redis_store import RedisFeatureStore, is_redis_url

    if is_redis_url(str(spec)):
        env = os.environ
        return RedisFeatureStore(
            str(spec),
            password=env.get("ONEREC_REDIS_PASSWORD"),
            timeout_s=float(env.get("ONEREC_REDIS_TIMEOUT_S", "0.5")),
            wait_replicas=int(env.get("ONEREC_REDIS_WAIT_REPLICAS", "0")),
            wait_timeout_ms=int(env.get("ONEREC_REDIS_WAIT_TIMEOUT_MS", "1000")),
        )
    if not Path(spec).is_file():
        raise FileNotFoundError(f"{spec}: no feature store (onerec build makes it)")
    return SQLiteFeatureStore(spec)


def bulk_load(spec: str | Path, rows: BulkRows, progress=None) -> None:
    """Fill the store ``spec`` names with ``rows``, replacing what it held for their users:
    a SQLite file is rebuilt aside and renamed into place; Redis is written with pipelined
    bulk writes, each user's keys replaced. ``progress`` wraps the users' iteration (a
    progress bar) where given."""
    from server.redis_store import is_redis_url, load_redis

    if is_redis_url(str(spec)):
        store = open_store(spec)
        try:
            load_redis(store, rows, progress)
        finally:
            store.close()
        return
    path = Path(spec)
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):  # a stale WAL would be
        stale.unlink(missing_ok=True)  # replayed into the new file
    write_sqlite(path, rows)
