"""The SQLite feature store and the serving pathway builder, on a real database file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.model import OneRecConfig
from onerec.pathways import EventArrays, History, build_pathways
from server.feature_store import EventRow, SQLiteFeatureStore, load_dataset
from server.pathway_builder import PathwayBuilder

CFG = OneRecConfig(n_items=120, short_len=20, positive_len=32, lifelong_len=40)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = generate(SyntheticConfig(n_users=12, n_items=120, max_history=400, seed=3))
    path = tmp_path_factory.mktemp("fs") / "features.sqlite"
    load_dataset(ds, path).close()
    vectors = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    return ds, path, vectors


def test_store_returns_the_event_log(data) -> None:
    ds, path, _ = data
    store = SQLiteFeatureStore(path)
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    for u, user_id in enumerate(ds.users["user_id"].astype(str)):
        want, got = events.user(u), store.history(user_id)
        for field in ("items", "timestamp", "watch_ms", "duration_ms", "flags"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        np.testing.assert_array_equal(store.static(user_id), static[u])
        assert store.version(user_id) == len(want)
    assert store.static("nobody") is None and store.version("nobody") == 0
    assert len(store.history("nobody")) == 0


def test_served_pathways_equal_the_trainers(data) -> None:
    ds, path, vectors = data
    builder = PathwayBuilder(SQLiteFeatureStore(path), CFG, vectors)
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
        assert built.history_len == len(h) and built.compressed and built.lifelong_s > 0
        np.testing.assert_array_equal(built.seen, np.unique(h.items))
        assert not builder.build(user_id, now, static[u]).compressed  # cached


def _row(item: int, ts: int, like: bool = False) -> EventRow:
    flags = (True, like, False, False, False, False)
    return EventRow(f"i{item}", item, ts, 30_000, 60_000, flags, like)


@pytest.mark.parametrize("refresh_events", [0, 64])
def test_appends_join_short_term_and_seen_and_refresh_the_lifelong_cache(
    data, tmp_path, refresh_events
) -> None:
    ds, _, vectors = data
    path = tmp_path / "f.sqlite"
    load_dataset(ds, path).close()
    store = SQLiteFeatureStore(path)
    builder = PathwayBuilder(store, CFG, vectors, refresh_events=refresh_events)
    user = str(ds.users["user_id"].iloc[0])
    last = int(store.history(user).timestamp[-1])
    static = store.static(user)
    builder.build(user, last + 10, static)
    assert store.append(user, [_row(7, last + 1, like=True), _row(9, last + 2)]) == 2
    built = builder.build(user, last + 10, static)
    assert built.compressed == (refresh_events == 0)  # recompressed, or reused
    assert {7, 9} <= set(built.seen.tolist())  # exact either way
    store.append(user, [_row(33, 1)])  # logged late: older than everything stored
    assert 33 in builder.build(user, last + 10, static).seen
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
    assert with_inline["short_items"][:3].tolist() == [12, 10, 8]
    assert len(with_inline["short_items"]) == CFG.short_len


def test_a_retried_request_id_is_committed_once(tmp_path) -> None:
    store = SQLiteFeatureStore(tmp_path / "retry.sqlite")
    events = [_row(1, 10), _row(2, 11)]
    assert store.append("u", events, request_id="r1") == 2
    assert store.append("u", events, request_id="r1") == 2  # the retry
    assert store.append("u", events[:1], request_id="r2") == 1
    assert store.version("u") == 3 and store.history("u").items.tolist() == [1, 1, 2]


def test_an_acknowledged_append_survives_kill_9(tmp_path) -> None:
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
