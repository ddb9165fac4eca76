"""Leave-last-out split, seen filtering and Recall/NDCG, checked against hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerec.data.loaders import load_source
from onerec.data.schema import FLAGS, Dataset, make_events
from onerec.metrics import (
    MISS,
    Split,
    evaluate_scorer,
    filter_topk_seen,
    gains,
    last_out,
    leave_last_out,
    mask_seen,
    metrics_from_ranks,
    rank_metrics,
    rank_metrics_from_topk,
)


def tiny_dataset(rows: list[tuple[str, str, int]], n_items: int = 8) -> Dataset:
    """Events from (user, item, timestamp) triples; items are i0..i{n_items-1}."""
    users = pd.DataFrame({"user_id": sorted({u for u, _, _ in rows})})
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "author_id": "a",
            "category": "c",
            "tag": "t",
            "title": "",
            "duration_ms": np.zeros(n_items, np.int64),
        }
    )
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame = frame.assign(watch_ms=0, duration_ms=0, **dict.fromkeys(FLAGS, 0))
    events = make_events(frame, pd.Index(users["user_id"]), pd.Index(items["item_id"]))
    return Dataset("tiny", events, users, items, np.zeros((n_items, 2), np.float32))


@pytest.fixture
def tiny() -> Dataset:
    # Rows arrive out of time order; u1 has 2 events and must be skipped.
    return tiny_dataset(
        [
            ("u0", "i3", 30),
            ("u0", "i1", 10),
            ("u0", "i2", 20),
            ("u1", "i4", 5),
            ("u1", "i5", 6),
            ("u2", "i6", 1),
            ("u2", "i0", 2),
            ("u2", "i7", 3),
            ("u2", "i5", 4),
        ]
    )


def test_leave_last_out_holds_out_the_latest_event_and_skips_short_users(tiny: Dataset) -> None:
    split = leave_last_out(tiny)
    np.testing.assert_array_equal(split.users, [0, 2])
    np.testing.assert_array_equal(split.target_items, [3, 5])  # u0's t=30, u2's t=4
    ts = tiny.events["timestamp"].to_numpy()
    np.testing.assert_array_equal(ts[split.history_end], [30, 4])
    np.testing.assert_array_equal(split.history_end - split.history_start, [2, 3])
    assert len(leave_last_out(tiny, min_events=4)) == 1
    assert len(leave_last_out(tiny, min_events=2)) == 3


def test_last_out_holds_out_each_of_the_last_n_events_against_its_own_history(
    tiny: Dataset,
) -> None:
    split = last_out(tiny, 2, min_events=2)
    ts = tiny.events["timestamp"].to_numpy()
    np.testing.assert_array_equal(split.users, [0, 0, 2, 2])  # u1 has 2 events: too few
    np.testing.assert_array_equal(ts[split.history_end], [20, 30, 3, 4])
    np.testing.assert_array_equal(split.history_end - split.history_start, [1, 2, 2, 3])
    np.testing.assert_array_equal(split.target_items, tiny.item_index()[split.history_end])
    last = leave_last_out(tiny)
    np.testing.assert_array_equal(split.history_end[1::2], last.history_end)
    assert len(last_out(tiny, 3, min_events=2)) == 3  # u2 alone has 4 events
    np.testing.assert_array_equal(last_out(tiny, 2).users, [2, 2])  # 2 events before the first


def test_target_rank_gives_the_textbook_values() -> None:
    scores = np.array([np.arange(100, 0, -1, dtype=float)] * 3)  # item j has rank j
    m = rank_metrics(scores, np.array([0, 5, 60]))
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    assert m["recall@50"] == pytest.approx(2 / 3)
    assert m["ndcg@50"] == pytest.approx(m["ndcg@10"])
    single = rank_metrics(scores[:1], np.array([0]))
    assert single == {"recall@10": 1.0, "ndcg@10": 1.0, "recall@50": 1.0, "ndcg@50": 1.0}


def test_ties_are_pessimistic_and_masked_targets_miss() -> None:
    flat = np.zeros((1, 20))
    assert rank_metrics(flat, np.array([0]), ks=(10,))["recall@10"] == 0.0  # 19 ties ahead
    assert rank_metrics(flat, np.array([0]), ks=(20,))["recall@20"] == 1.0
    masked = np.full((1, 5), -np.inf)
    assert rank_metrics(masked, np.array([2]), ks=(10,))["recall@10"] == 0.0


def test_seen_items_are_filtered(tiny: Dataset) -> None:
    split = leave_last_out(tiny)
    scores = np.zeros((2, tiny.n_items))
    scores[0, [1, 2]] = 10.0  # u0's history scored highest
    scores[0, 3] = 5.0  # u0's target
    scores[1, [6, 0, 7]] = 10.0
    scores[1, 5] = 5.0
    mask_seen(scores, split, tiny)
    assert np.isneginf(scores[0, [1, 2]]).all() and np.isneginf(scores[1, [6, 0, 7]]).all()
    assert rank_metrics(scores, split.target_items)["ndcg@10"] == 1.0


def test_a_seen_target_is_a_miss() -> None:
    ds = tiny_dataset([("u0", "i1", 1), ("u0", "i2", 2), ("u0", "i1", 3)])
    split = leave_last_out(ds)
    scores = np.arange(ds.n_items, 0, -1, dtype=float)[None]  # i1 ranks second before masking
    assert evaluate_scorer(lambda r: scores, split, ds)["recall@50"] == 0.0
    assert evaluate_scorer(lambda r: scores, split, ds, filter_seen=False)["recall@10"] == 1.0


def random_split(n_users: int, n_items: int, seed: int) -> tuple[Dataset, Split]:
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u:03d}", f"i{rng.integers(n_items)}", t)
        for u in range(n_users)
        for t in range(int(rng.integers(1, 12)))
    ]
    ds = tiny_dataset(rows, n_items)
    return ds, leave_last_out(ds)


def test_chunked_evaluation_equals_unchunked() -> None:
    ds, split = random_split(70, 40, seed=1)
    scores = np.random.default_rng(2).normal(size=(len(split), ds.n_items))
    full = rank_metrics(mask_seen(scores.copy(), split, ds), split.target_items)
    for chunk in (1, 7, 1000):
        assert evaluate_scorer(lambda r: scores[r], split, ds, chunk=chunk) == pytest.approx(full)


def test_topk_lists_give_the_same_metrics_as_full_scores() -> None:
    ds, split = random_split(70, 60, seed=3)
    scores = np.random.default_rng(4).normal(size=(len(split), ds.n_items))  # no ties
    full = rank_metrics(mask_seen(scores.copy(), split, ds), split.target_items, ks=(5, 10))
    # Beam search returns raw top-K lists, seen items included; filtering then keeps the order.
    # Histories hold at most 10 items, so 20 leave at least 10 unseen ones.
    topk = np.argsort(-scores, axis=1)[:, :20]
    filtered = filter_topk_seen(topk, split, ds)
    items = ds.item_index()
    for row in range(len(split)):
        seen = set(items[split.history_start[row] : split.history_end[row]])
        kept = [i for i in topk[row] if i not in seen]
        assert filtered[row].tolist() == kept + [-1] * (20 - len(kept))
        assert len(kept) >= 10
    assert rank_metrics_from_topk(filtered, split.target_items, ks=(5, 10)) == pytest.approx(full)


def test_topk_padding_and_short_lists_are_misses() -> None:
    topk = np.array([[4, -1, -1], [-1, -1, -1], [1, 2, 3]])
    m = rank_metrics_from_topk(topk, np.array([4, 0, 3]), ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 0.5) / 3)


def test_ml_latest_small_split(ml_latest_small: Path) -> None:
    ds = load_source(ml_latest_small)
    split = leave_last_out(ds)
    assert len(split) == 610
    events = ds.events
    latest = events.groupby("user_id", observed=True)["timestamp"].max().to_numpy()
    ts = events["timestamp"].to_numpy()
    np.testing.assert_array_equal(ts[split.history_end], latest[split.users])
    assert (events["user_id"].cat.codes.to_numpy()[split.history_end] == split.users).all()


def test_per_user_gains_average_to_the_metrics() -> None:
    ranks = np.array([0, 3, 12, MISS])
    assert gains(ranks, "ndcg@10").tolist() == pytest.approx([1.0, 1 / math.log2(5), 0.0, 0.0])
    assert gains(ranks, "recall@50").tolist() == [1.0, 1.0, 1.0, 0.0]
    metrics = metrics_from_ranks(ranks)
    assert metrics["ndcg@50"] == pytest.approx(gains(ranks, "ndcg@50").mean())
    assert metrics["recall@10"] == 0.5
    with pytest.raises(ValueError, match="mrr@10"):
        gains(ranks, "mrr@10")
