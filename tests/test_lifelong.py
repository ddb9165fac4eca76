"""Lifelong-history compression: bounded size, exact weights, and faithful coverage."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.runtime.lifelong import compress_history


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 3000), budget=st.integers(1, 400), seed=st.integers(0, 100))
def test_never_more_than_budget_and_weights_cover_the_history(
    n: int, budget: int, seed: int
) -> None:
    x = np.random.default_rng(seed).normal(size=(n, 8))
    c = compress_history(x, budget=budget, seed=seed)
    assert len(c.positions) == min(n, budget)
    assert c.weights.sum() == n
    assert (c.weights >= 1).all()
    assert (np.diff(c.positions) > 0).all()  # time order, no repeats
    assert c.positions.size == 0 or (c.positions.min() >= 0 and c.positions.max() < n)


def test_short_history_is_kept_whole() -> None:
    x = np.ones((50, 4))
    c = compress_history(x, budget=2000)
    np.testing.assert_array_equal(c.positions, np.arange(50))


def test_compression_keeps_every_interest_and_its_share() -> None:
    """A history of 20 tight interests with very different sizes: every interest keeps
    representatives, roughly in proportion to how much of the history it covers."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 16)) * 10
    sizes = np.geomspace(50, 5000, 20).astype(int)
    labels = np.repeat(np.arange(20), sizes)
    rng.shuffle(labels)
    x = centers[labels] + rng.normal(size=(len(labels), 16))
    c = compress_history(x, budget=500)
    kept = np.bincount(labels[c.positions], minlength=20)
    assert (kept > 0).all()
    share = np.bincount(labels[c.positions], weights=c.weights, minlength=20) / len(labels)
    np.testing.assert_allclose(share, sizes / sizes.sum(), atol=0.02)


def test_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(3).normal(size=(6000, 8))
    a, b = compress_history(x, budget=300, seed=1), compress_history(x, budget=300, seed=1)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.weights, b.weights)
