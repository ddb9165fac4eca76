"""Pathway building: what each pathway holds, and that the model accepts the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.event_arrays import EventArrays
from onerec.model import OneRec
from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import is_positive
from onerec.runtime.pathways import History, build_pathways, collate, gap_bucket

CFG = OneRecConfig(
    n_items=300,
    static_cardinalities=(7, 3, 12, 4),
    codebook_size=16,
    d_model=32,
    n_heads=2,
    d_ff=64,
    d_expert=32,
    short_len=20,
    positive_len=64,
    lifelong_len=100,
    n_queries=8,
)


@pytest.fixture(scope="module")
def data():
    ds = generate(
        SyntheticConfig(n_users=40, n_items=300, max_history=1500, min_history=10, seed=2)
    )
    return ds, EventArrays.from_dataset(ds)


def test_event_arrays_slice_each_user(data) -> None:
    ds, arrays = data
    lengths = np.bincount(ds.user_index(), minlength=ds.n_users)
    for u in (0, 7, ds.n_users - 1):
        h = arrays.user(u)
        assert len(h) == lengths[u]
        assert (np.diff(h.timestamp) >= 0).all()


def test_pathways_hold_what_they_promise(data) -> None:
    ds, arrays = data
    vectors = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    u = int(np.argmax(np.diff(arrays.offsets)))  # the heaviest user: compression kicks in
    h = arrays.user(u)
    now = int(h.timestamp[-1]) + 60_000
    p = build_pathways(h, now, np.zeros(4, np.int64), vectors, CFG)

    # Short-term: the last 20 events, most recent first.
    np.testing.assert_array_equal(p["short_items"], h.items[::-1][:20] + 1)
    # Positive feedback: only positive events, most recent first, at most positive_len.
    positive = np.flatnonzero(is_positive(h.scores()))
    np.testing.assert_array_equal(p["pos_items"], h.items[positive[::-1][: CFG.positive_len]] + 1)
    # Lifelong: compressed to the budget, time order kept.
    assert len(p["life_items"]) == CFG.lifelong_len < len(h)
    assert (np.diff(p["life_gap"]) <= 0).all()  # older representatives have larger gaps
    assert p["short_gap"][0] <= p["short_gap"][-1]


def test_gap_buckets_grow_with_age_and_saturate() -> None:
    ts = np.array([0, 1_000, 60_000, 86_400_000, 10**15])
    buckets = gap_bucket(10**15, ts)
    assert (np.diff(buckets[::-1]) >= 0).all()
    assert buckets.max() <= 32 and buckets.min() >= 1


def test_empty_history_gives_padding_only() -> None:
    empty = History(*(np.zeros(0, np.int64) for _ in range(4)), np.zeros((0, 6), np.int8))
    p = build_pathways(empty, 0, np.zeros(4, np.int64), np.zeros((300, 8), np.float32), CFG)
    batch = collate([p])
    assert batch["short_items"].shape == (1, 1) and batch["short_items"].sum() == 0


def test_collated_batch_runs_through_the_model(data) -> None:
    ds, arrays = data
    vectors = np.random.default_rng(0).normal(size=(ds.n_items, 8)).astype(np.float32)
    static = ds.users[ds.static_feature_columns()].to_numpy()
    samples = []
    for u in range(6):
        h = arrays.user(u).head(len(arrays.user(u)) - 1)
        samples.append(build_pathways(h, int(h.timestamp[-1]) + 1, static[u], vectors, CFG))
    batch = {k: torch.from_numpy(v) for k, v in collate(samples).items()}
    torch.manual_seed(0)
    n = CFG.n_items + 2
    model = OneRec(
        CFG,
        torch.randn(n, CFG.item_vector_dim),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, CFG.sid_levels, dtype=torch.long),
    )
    loss = model.loss(batch, torch.randint(0, CFG.codebook_size, (6, 3)))
    assert torch.isfinite(loss)
