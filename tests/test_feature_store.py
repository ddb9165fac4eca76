"""The feature stores (SQLite on a real file, Redis on a real redis-server) and the serving
pathway builder: the behavioural tests run against both stores."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import redis as redis_client

from loadtest.net import free_ports
from loadtest.redis_server import RedisServer
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.event_arrays import EventArrays
from onerec.feature_load import load_store
from onerec.runtime import lifelong
from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import is_positive
from onerec.runtime.lifelong import recent_distinct
from onerec.runtime.pathways import History, build_pathways
from server.feature_store import (
    EventRow,
    SQLiteFeatureStore,
    StoreUnavailable,
    stored_users,
)
from server.pathway_builder import PathwayBuilder
from server.redis_store import RedisFeatureStore

CFG = OneRecConfig(n_items=120, short_len=20, positive_len=32, lifelong_len=40)
STORES = ["sqlite", "redis"]


@pytest.fixture(scope="module")
def data():
    ds = generate(SyntheticConfig(n_users=12, n_items=120, max_history=400, seed=3))
    vectors = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    return ds, vectors


def _spec(kind: str, request, tmp_path) -> str:
    """Where a new, empty store of ``kind`` lives."""
    if kind == "redis":
        return request.getfixturevalue("redis_server").flush(1)
    return str(tmp_path / "features.sqlite")


def _open(spec: str):
    return RedisFeatureStore(spec) if spec.startswith("redis://") else SQLiteFeatureStore(spec)


@pytest.fixture(params=STORES)
def loaded(request, data, tmp_path):
    """A store of each kind holding the data set, as `onerec build` leaves it."""
    spec = _spec(request.param, request, tmp_path)
    assert stored_users(spec) == 0
    ds, vectors = data
    load_store(ds, spec, vectors, CFG.lifelong_len)
    load_store(ds, spec, vectors, CFG.lifelong_len)  # a reload replaces, never duplicates
    assert stored_users(spec) == data[0].n_users
    store = _open(spec)
    yield store
    store.close()


@pytest.fixture(params=STORES)
def empty(request, tmp_path):
    spec = _spec(request.param, request, tmp_path)
    if request.param == "sqlite":
        SQLiteFeatureStore(spec).close()
    store = _open(spec)
    yield store
    store.close()


def test_store_returns_the_event_log(data, loaded) -> None:
    ds, _ = data
    store = loaded
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    for u, user_id in enumerate(ds.users["user_id"].astype(str)):
        want, got = events.user(u), store.history(user_id)
        for field in ("items", "timestamp", "watch_ms", "duration_ms", "flags"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        np.testing.assert_array_equal(store.static(user_id), static[u])
        assert store.version(user_id) == len(want)
        last = store.recent(user_id, 5)
        np.testing.assert_array_equal(last.items, want.items[-5:])
        positive = store.recent(user_id, 3, positive_only=True)
        np.testing.assert_array_equal(positive.items, want.items[is_positive(want.scores())][-3:])
    assert store.static("nobody") is None and store.version("nobody") == 0
    assert len(store.history("nobody")) == 0 and len(store.recent("nobody", 20)) == 0
    assert store.any_user() in set(ds.users["user_id"].astype(str))
    store.ping()


def test_served_pathways_equal_the_trainers(data, loaded) -> None:
    ds, vectors = data
    builder = PathwayBuilder(loaded, CFG, vectors)
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    for u, user_id in enumerate(ds.users["user_id"].astype(str)):
        h = events.user(u)
        now = int(h.timestamp[-1]) + 5_000
        want = build_pathways(h, now, static[u], vectors, CFG)
        built = builder.build(user_id, now, static[u])
        assert set(built.pathways) == set(want)
        for name in want:
            np.testing.assert_array_equal(built.pathways[name], want[name], err_msg=name)
        assert built.history_len == len(h) and built.source == "store"  # the build's record
        assert sorted(built.seen.tolist()) == np.unique(h.items).tolist()
        np.testing.assert_array_equal(built.seen[:3], recent_distinct(h.items)[:3])
        assert builder.build(user_id, now, static[u]).source == "cache"
    builder.refresher.close()


def _row(item: int, ts: int, like: bool = False, item_id: str | None = None) -> EventRow:
    flags = (True, like, False, False, False, False)
    return EventRow(item_id or f"i{item}", item, ts, 30_000, 60_000, flags, like)


@pytest.mark.parametrize("refresh_events", [0, 64])
def test_appends_join_short_term_and_seen_and_refresh_the_lifelong_cache(
    data, loaded, refresh_events
) -> None:
    ds, vectors = data
    store = loaded
    builder = PathwayBuilder(store, CFG, vectors, refresh_events=refresh_events)
    user = str(ds.users["user_id"].iloc[0])
    last = int(store.history(user).timestamp[-1])
    static = store.static(user)
    stored = store.lifelong(user)
    builder.build(user, last + 10, static)
    assert store.append(user, [_row(7, last + 1, like=True), _row(9, last + 2)]) == 2
    built = builder.build(user, last + 10, static)
    assert built.source == "cache" and built.seen[:2].tolist() == [9, 7]  # exact at once
    builder.refresher.drain()  # a refresh was asked for only past the allowance
    record = store.lifelong(user)
    assert record.version == (stored.version + 2 if refresh_events == 0 else stored.version)
    assert builder.build(user, last + 10, static).source == (
        "store" if refresh_events == 0 else "cache"
    )
    store.append(user, [_row(33, 1)])  # logged late: older than everything stored
    assert 33 in builder.build(user, last + 10, static).seen
    store.append(user, [_row(CFG.n_items, last + 4, item_id="brand-new")])
    assert builder.build(user, last + 10, static).seen_new.tolist() == ["brand-new"]
    got = built.pathways
    assert got["short_items"][:2].tolist() == [10, 8]  # most recent first, index + 1
    assert got["pos_items"][0] == 8
    inline = History(
        np.array([11]),
        np.array([last + 3]),
        np.array([1]),
        np.array([60_000]),
        np.zeros((1, 6), np.int8),
    )
    with_inline = builder.build(user, last + 10, static, inline).pathways
    assert with_inline["short_items"][:4].tolist() == [CFG.n_items + 1, 12, 10, 8]
    assert len(with_inline["short_items"]) == CFG.short_len


def test_a_record_another_front_end_refreshed_replaces_the_cached_one(data, loaded) -> None:
    """Front ends A and B share a store. A caches a user's record, events arrive, and B
    refreshes the record first: A's own refresh finds it fresh, recompresses nothing, and
    still drops A's stale entry, so A's next request reads B's record."""
    ds, vectors = data
    store = loaded
    a = PathwayBuilder(store, CFG, vectors, refresh_events=0)
    b = PathwayBuilder(store, CFG, vectors, refresh_events=0)
    user = str(ds.users["user_id"].iloc[1])
    last = int(store.history(user).timestamp[-1])
    static = store.static(user)
    a.build(user, last + 10, static)
    store.append(user, [_row(5, last + 1)])
    assert b.refresher.refresh(user) and store.lifelong_version(user) == store.version(user)
    assert a.build(user, last + 10, static).source == "cache"  # stale: asks for a refresh
    a.refresher.drain()
    assert store.lifelong_version(user) == store.version(user)
    assert a.build(user, last + 10, static).source == "store"
    assert not a.refresher.refresh(user)  # fresh: nothing recompressed
    a.refresher.close()
    b.refresher.close()


def test_a_retried_request_id_is_committed_once(empty) -> None:
    store = empty
    events = [_row(1, 10), _row(2, 11)]
    assert store.append("u", events, request_id="r1") == 2
    assert store.append("u", events, request_id="r1") == 2  # the retry
    assert store.append("u", events[:1], request_id="r2") == 1
    assert store.version("u") == 3 and store.history("u").items.tolist() == [1, 1, 2]
    assert store.static("u") is None  # known by events alone


def test_equal_timestamps_keep_append_order_and_marks_follow_appends(empty) -> None:
    store = empty
    assert store.mark("u") == 0 and store.items_after("u", 0)[0].tolist() == []
    store.append("u", [_row(5, 100), _row(6, 100, like=True)])
    mark = store.mark("u")
    store.append("u", [_row(7, 100), _row(8, 50, like=True)])
    assert store.history("u").items.tolist() == [8, 5, 6, 7]  # time order; ties by append
    assert store.recent("u", 2).items.tolist() == [6, 7]
    assert store.recent("u", 5, positive_only=True).items.tolist() == [8, 6]
    items, after = store.items_after("u", mark)
    assert items.tolist() == [7, 8] and after == store.mark("u")
    assert store.items_after("u", after)[0].tolist() == []
    store.append("u", [_row(120, 101, item_id="new-a"), _row(121, 102, item_id="new-b")])
    assert sorted(store.items_outside("u", 120)) == ["new-a", "new-b"]
    assert store.items_outside("u", 122) == []


def test_concurrent_appends_for_one_user_all_land(empty) -> None:
    """Two writers (two front ends, for Redis) appending for one user at once: every
    event lands once and every append number is distinct."""
    store = empty
    spec = store.url if isinstance(store, RedisFeatureStore) else store.path

    def writer(w: int) -> None:
        own = _open(spec)
        for i in range(40):
            own.append("u", [_row(w * 100 + i, 1_000 + i), _row(w * 100 + i, 2_000 + i)])
        own.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.version("u") == 160
    h = store.history("u")
    assert len(h) == 160 and (np.diff(h.timestamp) >= 0).all()
    assert sorted(store.items_after("u", 0)[0].tolist()) == sorted(h.items.tolist())


def test_an_acknowledged_append_survives_kill_9_of_the_writer(tmp_path) -> None:
    path = tmp_path / "crash.sqlite"
    SQLiteFeatureStore(path).close()
    script = textwrap.dedent(f"""
        import sys, time
        from server.feature_store import EventRow, SQLiteFeatureStore
        store = SQLiteFeatureStore({str(path)!r})
        for i in range(50):
            store.append("u", [EventRow(f"i{{i}}", i, i, 1, 2, (False,) * 6, False)])
            print(i, flush=True)  # the acknowledgement
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = [proc.stdout.readline() for _ in range(50)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert acked[-1].strip() == "49"
    store = SQLiteFeatureStore(path)
    assert store.version("u") == 50 and store.history("u").items.tolist() == list(range(50))


def test_acknowledged_appends_survive_kill_9_of_redis(redis_server) -> None:
    """With ``appendfsync always`` Redis fsyncs its AOF before it replies: after kill -9
    and a restart on the same directory, every acknowledged append is there."""
    store = RedisFeatureStore(redis_server.flush(2))
    acked = sum(store.append("u", [_row(i, i)], request_id=f"r{i}") for i in range(200))
    redis_server.kill()  # SIGKILL
    with pytest.raises(StoreUnavailable):
        store.append("u", [_row(999, 999)])  # nothing to acknowledge it: never acked
    redis_server.start()
    assert acked == 200 and store.version("u") == 200
    assert store.history("u").items.tolist() == list(range(200))
    assert store.append("u", [_row(0, 0)], request_id="r0") == 1  # retries still deduplicated
    assert store.version("u") == 200
    store.close()


def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisFeatureStore(f"redis://127.0.0.1:{free_ports(1)[0]}/0", timeout_s=0.2)
    for call in (
        store.ping,
        lambda: store.static("u"),
        lambda: store.recent("u", 20),
        lambda: store.append("u", [_row(1, 1)]),
    ):
        with pytest.raises(StoreUnavailable, match=r"redis 127\.0\.0\.1"):
            call()


def test_missing_replica_acknowledgements_are_not_an_acknowledgement(redis_server) -> None:
    """WAIT for a replica this server does not have: the append raises, so LogEvents
    answers UNAVAILABLE, and the client's retry with the same id stores it once."""
    url = redis_server.flush(3)
    store = RedisFeatureStore(url, wait_replicas=1, wait_timeout_ms=50)
    with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        store.append("u", [_row(1, 1)], request_id="r1")
    plain = RedisFeatureStore(url)
    assert plain.append("u", [_row(1, 1)], request_id="r1") == 1 and plain.version("u") == 1


def test_requests_never_run_kmeans_and_new_users_get_a_record_in_the_background(
    data, empty, monkeypatch
) -> None:
    """A user known only by LogEvents has no record: a request uses the last events as
    they are (no k-means on the request's thread), and asks the refresher, whose thread
    compresses and stores the record the next request reads."""
    _, vectors = data
    store = empty
    kmeans_threads: list[str] = []
    real = lifelong._kmeans

    def spy(*args, **kwargs):
        kmeans_threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifelong, "_kmeans", spy)
    budget = CFG.lifelong_len
    items = np.arange(3 * budget) % len(vectors)
    store.append("heavy", [_row(int(i), 1_000 + t) for t, i in enumerate(items)])
    builder = PathwayBuilder(store, CFG, vectors)
    built = builder.build("heavy", 10_000, np.zeros(0, np.int64))
    # The refresher may already be clustering; never on the request's own thread.
    assert built.source == "recent" and threading.current_thread().name not in kmeans_threads
    np.testing.assert_array_equal(built.pathways["life_items"], items[-budget:] + 1)
    builder.refresher.drain()
    assert set(kmeans_threads) == {"lifelong-refresh"}
    record = store.lifelong("heavy")
    assert record.version == len(items) and len(record.items) <= budget
    again = builder.build("heavy", 10_000, np.zeros(0, np.int64))
    assert again.source == "store" and again.pathways["life_weight"].max() > 1
    builder.refresher.close()


def test_an_older_record_never_replaces_a_newer_one(empty) -> None:
    """Two front ends refreshing one user at once: the record covering more events stays."""
    store = empty
    vectors = np.zeros((10, 4), np.float32)
    empty_ids = np.zeros(0, str)
    old = lifelong.lifelong_record(np.arange(5), np.arange(5), vectors, 40, 5, empty_ids)
    new = lifelong.lifelong_record(np.arange(8), np.arange(8), vectors, 40, 8, empty_ids)
    store.put_lifelong("u", new)
    store.put_lifelong("u", old)
    assert store.lifelong("u").version == 8


def test_a_sqlite_file_that_cannot_serve_raises_store_unavailable(tmp_path) -> None:
    """A writer that holds the lock past the timeout (a stuck bulk load, say): the append
    is refused as unavailable, so LogEvents answers UNAVAILABLE, not INTERNAL."""
    path = tmp_path / "f.sqlite"
    store = SQLiteFeatureStore(path, timeout_s=0.1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable, match="locked"):
        store.append("u", [_row(1, 1)], request_id="r1")
    blocker.execute("ROLLBACK")
    assert store.append("u", [_row(1, 1)], request_id="r1") == 1  # the retry lands once
    assert store.version("u") == 1
    blocker.close()
    store.close()


def test_a_read_only_redis_raises_store_unavailable_and_auto_tokens_expire_soon(
    redis_binary, tmp_path
) -> None:
    """A Redis demoted to a replica (failover) refuses writes with READONLY: that is the
    store being unavailable, not a bad call. A call without a request id leaves its
    made-up token for a minute, not the day a caller's id is kept."""
    with RedisServer(tmp_path) as server:
        store = RedisFeatureStore(server.url())
        assert store.append("u", [_row(1, 1)]) == 1
        admin = redis_client.Redis.from_url(server.url())
        (token,) = admin.keys("onerec:{u}:req:*")
        assert 0 < admin.ttl(token) <= 60
        store.append("u", [_row(2, 2)], request_id="mine")
        assert admin.ttl("onerec:{u}:req:mine") > 3600
        admin.replicaof("127.0.0.1", free_ports(1)[0])  # a master that is not there
        try:
            with pytest.raises(StoreUnavailable, match="read only replica"):
                store.append("u", [_row(3, 3)], request_id="r3")
        finally:
            admin.replicaof("NO", "ONE")
        assert store.append("u", [_row(3, 3)], request_id="r3") == 1
        assert store.version("u") == 3
        admin.close()
        store.close()
