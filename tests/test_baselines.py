"""Popularity and SASRec baselines: sane on synthetic data, deterministic, and real-data ready."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from onerec.baselines import PopularityModel, SASRec, SASRecConfig, sasrec_scores, train_sasrec
from onerec.data.loaders import load_source
from onerec.data.schema import Dataset
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.metrics import Split, evaluate_scorer, leave_last_out

# More items than a typical history, so most targets are unseen and ranking them is informative.
SMALL = SyntheticConfig(n_users=300, n_items=2000, max_history=300, min_history=10, seed=0)
TINY_SASREC = {"maxlen": 50, "hidden": 16}


@pytest.fixture(scope="module")
def small() -> tuple[Dataset, Split]:
    ds = generate(SMALL)
    return ds, leave_last_out(ds)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_popularity_counts_only_training_events(small: tuple[Dataset, Split]) -> None:
    ds, split = small
    pop = PopularityModel.fit(ds, split)
    assert pop.counts.sum() == len(ds.events) - len(split)
    scores = pop.scores(np.arange(3))
    assert scores.shape == (3, ds.n_items)
    np.testing.assert_array_equal(scores[0], scores[2])


def test_popularity_beats_random(small: tuple[Dataset, Split]) -> None:
    ds, split = small
    pop = evaluate_scorer(PopularityModel.fit(ds, split).scores, split, ds)
    rng = np.random.default_rng(0)
    rand = evaluate_scorer(lambda rows: rng.random((len(rows), ds.n_items)), split, ds)
    assert pop["recall@50"] > 2 * rand["recall@50"]
    assert pop["ndcg@10"] > rand["ndcg@10"]


def test_sasrec_is_causal_and_finite_on_padding() -> None:
    model = SASRec(SASRecConfig(n_items=30, **TINY_SASREC)).eval()
    tokens = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 3, 9]])
    hidden = model(tokens)  # (B, T, H)
    assert hidden.shape == (3, 4, 16) and torch.isfinite(hidden).all()
    assert model.logits(hidden).shape == (3, 4, 30)
    # A later item does not change earlier states; an earlier one changes later states.
    torch.testing.assert_close(hidden[2, :3], hidden[0, :3])
    assert not torch.allclose(hidden[0, -1], hidden[1, -1])


def test_sasrec_learns_and_is_deterministic(small: tuple[Dataset, Split]) -> None:
    ds, split = small
    cfg = SASRecConfig(n_items=ds.n_items, **TINY_SASREC, lr=5e-3)
    model = train_sasrec(ds, split, cfg, epochs=4, seed=3, progress=False)
    losses = model.train_losses
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    again = train_sasrec(ds, split, cfg, epochs=4, seed=3, progress=False)
    rows = np.arange(20)
    a, b = sasrec_scores(model, ds, split, rows), sasrec_scores(again, ds, split, rows)
    assert a.shape == (20, ds.n_items)
    np.testing.assert_array_equal(a, b)
    other = train_sasrec(ds, split, cfg, epochs=1, seed=4, progress=False)
    assert not np.array_equal(sasrec_scores(other, ds, split, rows), a)


def test_popularity_on_ml_latest_small(ml_latest_small: Path) -> None:
    ds = load_source(ml_latest_small)
    split = leave_last_out(ds)
    m = evaluate_scorer(PopularityModel.fit(ds, split).scores, split, ds)
    assert set(m) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    assert all(0.0 < v < 1.0 for v in m.values())
    assert m["recall@50"] >= m["recall@10"]
