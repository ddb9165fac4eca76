"""The :class:`~server.feature_store.FeatureStore` in Redis, shared by a fleet of front ends.

One user's keys share the hash tag ``{user_id}``, so a Redis Cluster keeps them on one
shard and the append script may touch them all:

* ``onerec:{u}:static``  the profile codes (int64 bytes); the user is also in ``onerec:users``;
* ``onerec:{u}:n``       events appended so far: the version (cache key) and the append mark;
* ``onerec:{u}:ev``      every event, a sorted set scored by timestamp; a member is the
  event's 8-byte big-endian append number, then its fields, then its item id, so events
  with one timestamp keep their append order (as SQLite's ``ORDER BY ts, rowid`` does);
* ``onerec:{u}:pos``     the positive events, the same members;
* ``onerec:{u}:log``     the model indices in append order, int64 bytes (``items_after``);
* ``onerec:{u}:ids``     each distinct item id, scored by its model index (``items_outside``);
* ``onerec:{u}:req:<id>`` a LogEvents request id already applied, with its count, for a day;
* ``onerec:{u}:life``    the compressed lifelong pathway and seen items (a hash: ``v``, the
  events it covers, and ``r``, the record), replaced only by one that covers more.

``append`` runs one Lua script, so a call's events land together or not at all and two
front ends appending for one user get distinct append numbers. It returns only after Redis
has replied, which with ``appendfsync always`` is after the AOF fsync, and, when
``wait_replicas`` is set, after that many replicas acknowledged (``WAIT``); otherwise it
raises :class:`~server.feature_store.StoreUnavailable` and the caller must not acknowledge.
Reads of the last ``n`` events are rank ranges on the sorted sets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from urllib.parse import urlsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from onerec.runtime.lifelong import LifelongRecord
from onerec.runtime.pathways import History
from server.feature_store import FLAG_BITS, BulkRows, EventRow, StoreUnavailable

PREFIX = "onerec"
USERS = f"{PREFIX}:users"
REQUEST_TTL_S = 24 * 3600  # a caller's retry comes within seconds; a day is generous
# Our own token only guards the client's single reconnect-and-retry, a moment later.
AUTO_TOKEN_TTL_S = 60
# Errors that say the store cannot take the call now, rather than that the call is wrong:
# a replica promoted or read-only, memory full, a cluster without a master for the slot.
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
)
# Refusals Redis sends as plain errors: too few replicas (min-replicas-to-write), a failed
# background save blocking writes, a replica still loading or cut off from its master.
_UNAVAILABLE_REPLIES = ("NOREPLICAS", "MISCONF", "MASTERDOWN", "LOADING")
SEQ = np.dtype(">u8")
FIELDS = np.dtype(
    [
        ("item_idx", "<i8"),
        ("ts", "<i8"),
        ("watch_ms", "<i8"),
        ("duration_ms", "<i8"),
        ("flags", "<u2"),
        ("positive", "u1"),
    ]
)
HEAD = np.dtype([("seq", SEQ), *((n, FIELDS.fields[n][0]) for n in FIELDS.names)])

# KEYS: n, ev, pos, log, ids, req.  ARGV: request ttl, log bytes, then per event
# (ts, positive, fields, item id, model index).
_APPEND = """#!lua
local done = redis.call("GET", KEYS[6])
if done then return tonumber(done) end
local v = tonumber(redis.call("GET", KEYS[1]) or "0")
local n = (#ARGV - 2) / 5
for i = 0, n - 1 do
  local o = 3 + i * 5
  local member = struct.pack(">I8", v + i + 1) .. ARGV[o + 2]
  redis.call("ZADD", KEYS[2], ARGV[o], member)
  if ARGV[o + 1] == "1" then redis.call("ZADD", KEYS[3], ARGV[o], member) end
  redis.call("ZADD", KEYS[5], ARGV[o + 4], ARGV[o + 3])
end
redis.call("APPEND", KEYS[4], ARGV[2])
redis.call("SET", KEYS[1], v + n)
redis.call("SET", KEYS[6], n, "EX", ARGV[1])
return n
"""


# KEYS: life.  ARGV: version, record.
_PUT_LIFELONG = """#!lua
local stored = tonumber(redis.call("HGET", KEYS[1], "v") or "-1")
if tonumber(ARGV[1]) >= stored then
  redis.call("HSET", KEYS[1], "v", ARGV[1], "r", ARGV[2])
end
return 0
"""


def is_redis_url(spec: str | None) -> bool:
    return spec is not None and urlsplit(spec).scheme in ("redis", "rediss", "unix")


def redact(spec: str) -> str:
    """``spec`` fit for a log: a URL's password replaced."""
    u = urlsplit(spec)
    if not is_redis_url(spec) or not u.password:
        return spec
    return u._replace(netloc=u.netloc.replace(f":{u.password}@", ":***@")).geturl()


def _key(user_id: str, name: str) -> str:
    return f"{PREFIX}:{{{user_id}}}:{name}"


def _decode(members: list[bytes]) -> History:
    """Sorted-set members -> a History, with no per-event Python work beyond their lengths."""
    n = len(members)
    if not n:
        z = np.zeros(0, np.int64)
        return History(z, z, z, z, np.zeros((0, len(FLAG_BITS)), np.int8))
    lengths = np.fromiter(map(len, members), np.int64, n)
    buf = np.frombuffer(b"".join(members), np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths[:-1])])
    rec = buf[starts[:, None] + np.arange(HEAD.itemsize)].view(HEAD)[:, 0]
    flags = ((rec["flags"].astype(np.int64)[:, None] & FLAG_BITS) > 0).astype(np.int8)
    as64 = [rec[f].astype(np.int64) for f in ("item_idx", "ts", "watch_ms", "duration_ms")]
    return History(*as64, flags)


def _fields(rows: list[EventRow]) -> np.ndarray:
    a = np.zeros(len(rows), FIELDS)
    if rows:
        a["item_idx"] = [r.item_idx for r in rows]
        a["ts"] = [r.timestamp_ms for r in rows]
        a["watch_ms"] = [r.watch_ms for r in rows]
        a["duration_ms"] = [r.duration_ms for r in rows]
        a["flags"] = np.asarray([r.flags for r in rows], np.int64) @ FLAG_BITS
        a["positive"] = [r.positive for r in rows]
    return a


class RedisFeatureStore:
    """The feature store on a Redis server (``redis://``, ``rediss://`` or ``unix://``)."""

    reads_wait = True  # a round trip, up to ``timeout_s`` when Redis hangs

    def __init__(
        self,
        url: str,
        password: str | None = None,
        timeout_s: float = 0.5,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.url = url
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        # One quick retry heals a pooled connection that a Redis restart broke. A timeout
        # is not retried: a Redis that hangs would cost every call twice the timeout.
        self.r = redis.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            health_check_interval=30,
        )
        self._append = self.r.register_script(_APPEND)
        self._put_lifelong = self.r.register_script(_PUT_LIFELONG)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"redis {self._where()}: {e}") from e
        except redis.ResponseError as e:
            if str(e).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"redis {self._where()}: {e}") from e
            raise

    def _where(self) -> str:
        u = urlsplit(self.url)
        return u.hostname or u.path or self.url

    def ping(self) -> None:
        with self._errors():
            self.r.ping()

    def static(self, user_id: str) -> np.ndarray | None:
        with self._errors():
            raw = self.r.get(_key(user_id, "static"))
        return None if raw is None else np.frombuffer(raw, np.int64).copy()

    def version(self, user_id: str) -> int:
        with self._errors():
            return int(self.r.get(_key(user_id, "n")) or 0)

    def recent(self, user_id: str, n: int, positive_only: bool = False) -> History:
        if n <= 0:
            return _decode([])
        with self._errors():
            members = self.r.zrange(_key(user_id, "pos" if positive_only else "ev"), -n, -1)
        return _decode(members)

    def history(self, user_id: str) -> History:
        with self._errors():
            return _decode(self.r.zrange(_key(user_id, "ev"), 0, -1))

    def mark(self, user_id: str) -> int:
        return self.version(user_id)  # the n-th append is the mark after it

    def items_after(self, user_id: str, mark: int) -> tuple[np.ndarray, int]:
        with self._errors():
            raw = self.r.getrange(_key(user_id, "log"), 8 * mark, -1)
        items = np.frombuffer(raw, "<i8").astype(np.int64)
        return items, mark + len(items)

    def any_user(self) -> str | None:
        with self._errors():
            user = self.r.srandmember(USERS)
        return None if user is None else user.decode()

    def items_outside(self, user_id: str, n_items: int) -> list[str]:
        with self._errors():
            ids = self.r.zrange(_key(user_id, "ids"), n_items, "+inf", byscore=True)
        return [i.decode() for i in ids]

    def lifelong(self, user_id: str) -> LifelongRecord | None:
        with self._errors():
            raw = self.r.hget(_key(user_id, "life"), "r")
        return None if raw is None else LifelongRecord.from_bytes(raw)

    def lifelong_version(self, user_id: str) -> int | None:
        with self._errors():
            raw = self.r.hget(_key(user_id, "life"), "v")
        return None if raw is None else int(raw)

    def put_lifelong(self, user_id: str, record: LifelongRecord) -> None:
        with self._errors():
            self._put_lifelong(
                keys=[_key(user_id, "life")], args=[record.version, record.to_bytes()]
            )

    def append(self, user_id: str, events: Iterable[EventRow], request_id: str = "") -> int:
        rows = list(events)
        fields = _fields(rows)
        # Without the caller's id, one of our own makes the client's single retry on a
        # broken connection safe: a reply lost after Redis applied the script finds it
        # applied instead of applying it twice.
        token = request_id or f"auto-{uuid.uuid4().hex}"
        ttl = REQUEST_TTL_S if request_id else AUTO_TOKEN_TTL_S
        args: list = [ttl, fields["item_idx"].tobytes()]
        for row, f in zip(rows, fields, strict=True):
            args += [row.timestamp_ms, int(row.positive), f.tobytes(), row.item_id, row.item_idx]
        keys = [_key(user_id, k) for k in ("n", "ev", "pos", "log", "ids", f"req:{token}")]
        with self._errors():
            return self._run_append(keys, args)

    def _run_append(self, keys: list[str], args: list) -> int:
        if not self.wait_replicas:
            return int(self._append(keys=keys, args=args))
        pipe = self.r.pipeline(transaction=False)  # WAIT must follow on the same connection
        self._append(keys=keys, args=args, client=pipe)
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        accepted, acked = pipe.execute()
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"redis {self._where()}: {acked} of {self.wait_replicas} replicas acknowledged "
                f"within {self.wait_timeout_ms} ms"
            )
        return int(accepted)

    def stored_users(self) -> int:
        with self._errors():
            return int(self.r.scard(USERS))

    def close(self) -> None:
        self.r.close()


def load_redis(store: RedisFeatureStore, rows: BulkRows, progress=None) -> None:
    """Write ``rows``, replacing what the store held for their users, with pipelined bulk
    writes (one round trip per batch of users)."""
    order = np.argsort(rows.event_user, kind="stable")  # each user's events in log order
    users, starts = np.unique(rows.event_user[order], return_index=True)
    events_of = dict(zip(users.tolist(), np.split(order, starts[1:]), strict=True))
    pipe = store.r.pipeline(transaction=False)
    queued = 0
    for u, user in enumerate((progress or iter)(rows.user_ids)):
        keys = [_key(user, k) for k in ("static", "n", "ev", "pos", "log", "ids", "life")]
        pipe.delete(*keys)
        pipe.set(keys[0], rows.static[u].tobytes())
        pipe.sadd(USERS, user)
        events = events_of.get(user)
        if events is not None:
            _queue_events(pipe, keys, rows, events)
            queued += len(events)
        record = rows.lifelong[u]
        if record is not None:  # the mark after a user's n-th append is n
            record = replace(record, mark=record.version)
            pipe.hset(keys[6], mapping={"v": record.version, "r": record.to_bytes()})
        queued += 1
        if queued >= 50_000:
            pipe.execute()
            queued = 0
    pipe.execute()


def _queue_events(pipe, keys: list[str], ev: BulkRows, rows: np.ndarray) -> None:
    """One user's events (``rows`` of ``ev``, in log order) as the append script writes them."""
    head = np.zeros(len(rows), HEAD)
    head["seq"] = np.arange(1, len(rows) + 1)
    for name in FIELDS.names:
        head[name] = getattr(ev, name)[rows]
    raw, step = head.tobytes(), HEAD.itemsize
    ids = ev.item_id[rows].tolist()
    members = [raw[i * step : (i + 1) * step] + item.encode() for i, item in enumerate(ids)]
    ts = head["ts"].tolist()
    pipe.zadd(keys[2], dict(zip(members, ts, strict=True)))
    positive = np.flatnonzero(head["positive"]).tolist()
    if positive:
        pipe.zadd(keys[3], {members[i]: ts[i] for i in positive})
    pipe.set(keys[4], head["item_idx"].astype("<i8").tobytes())
    pipe.zadd(keys[5], dict(zip(ids, head["item_idx"].tolist(), strict=True)))
    pipe.set(keys[1], len(rows))
