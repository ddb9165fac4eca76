"""Balanced RQ-KMeans: balance, falling error, determinism, collisions and new items."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.runtime.catalog import collision_ranks
from onerec.tokenizer import (
    SemanticTokenizer,
    TokenizerConfig,
    balanced_assign,
    balanced_kmeans,
    codebook_size_for,
    collision_stats,
)


def _mixture(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d)) * 3
    # Skewed mixture: an unbalanced k-means would give one cluster far more than N/K.
    weights = np.geomspace(1, 50, 20)
    comp = rng.choice(20, n, p=weights / weights.sum())
    return (centers[comp] + rng.normal(size=(n, d))).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    k=st.integers(1, 40),
    d=st.integers(1, 8),
    seed=st.integers(0, 10_000),
)
def test_balance_holds_for_random_inputs(n: int, k: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.exponential(1.0, size=(n, 1))
    centroids, assign = balanced_kmeans(x, k, iters=3, seed=seed)
    assert centroids.shape == (k, d)
    assert assign.shape == (n,) and assign.min() >= 0 and assign.max() < k
    assert np.bincount(assign, minlength=k).max() <= math.ceil(n / k)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_balanced_assign_respects_any_capacity(n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    c = rng.normal(size=(k, 3)) * 5  # far-off centroids crowd items onto a few
    cap = math.ceil(n / k)
    assign = balanced_assign(x, c, cap, candidates=2)
    assert (assign >= 0).all()
    assert np.bincount(assign, minlength=k).max() <= cap


def test_quantisation_error_falls_at_each_level() -> None:
    x = _mixture(3000)
    _, _, stats = SemanticTokenizer.fit(
        x, TokenizerConfig(levels=3, codebook_size=32), progress=False
    )
    errors = [stats["input_energy"]] + [lv["quantisation_error"] for lv in stats["levels"]]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    for lv in stats["levels"]:
        assert lv["cluster_max"] <= lv["capacity"] == math.ceil(3000 / 32)


def test_unbalanced_kmeans_would_break_the_cap_but_ours_does_not() -> None:
    """The skewed mixture is a real test of balancing, not a trivially balanced input."""
    import faiss

    x = _mixture(3000)
    km = faiss.Kmeans(x.shape[1], 32, niter=10, seed=0)
    km.train(x)
    _, plain = km.index.search(x, 1)
    assert np.bincount(plain.ravel(), minlength=32).max() > math.ceil(3000 / 32)
    _, ours = balanced_kmeans(x, 32)
    assert np.bincount(ours, minlength=32).max() <= math.ceil(3000 / 32)


def test_same_seed_same_sids() -> None:
    x = _mixture(2000, seed=3)
    cfg = TokenizerConfig(codebook_size=16, seed=5)
    _, a, _ = SemanticTokenizer.fit(x, cfg, progress=False)
    _, b, _ = SemanticTokenizer.fit(x, cfg, progress=False)
    np.testing.assert_array_equal(a, b)


def test_new_item_gets_a_valid_sid_from_saved_codebooks(tmp_path) -> None:
    x = _mixture(2000, seed=4)
    cfg = TokenizerConfig(codebook_size=16)
    tok, codes, _ = SemanticTokenizer.fit(x[:1900], cfg, progress=False)
    tok.save(tmp_path / "codebooks.npz")
    loaded = SemanticTokenizer.load(tmp_path / "codebooks.npz")
    assert loaded.config == cfg
    new = loaded.encode(x[1900:])
    assert new.shape == (100, 3)
    assert new.min() >= 0 and new.max() < 16
    # Nearest-centroid codes reconstruct new items as well as training items.
    err_new = ((loaded.decode(new) - x[1900:]) ** 2).sum(1).mean()
    err_train = ((loaded.decode(codes) - x[:1900]) ** 2).sum(1).mean()
    assert err_new < 1.5 * err_train


def test_codebook_size_follows_the_catalog_not_a_flag(tmp_path) -> None:
    # One rule for every data set: 16 leaves per item, powers of two, at least 8.
    assert [codebook_size_for(n, 3) for n in (10, 9_742, 10_000, 100_000, 1_000_000)] == [
        8,
        64,
        64,
        128,
        256,
    ]
    assert codebook_size_for(10_000, 2) == 512
    x = _mixture(2000, seed=6)
    tok, codes, stats = SemanticTokenizer.fit(x, TokenizerConfig(), progress=False)
    assert tok.config.codebook_size == codebook_size_for(2000, 3) == 32
    assert codes.max() < 32 and stats["levels"][0]["capacity"] == math.ceil(2000 / 32)
    tok.save(tmp_path / "codebooks.npz")
    assert SemanticTokenizer.load(tmp_path / "codebooks.npz").config.codebook_size == 32


def test_collision_rule_ranks_by_popularity_then_catalog_order() -> None:
    codes = np.array([[0, 0, 0], [1, 2, 3], [0, 0, 0], [0, 0, 0], [1, 2, 4]])
    popularity = np.array([5, 1, 9, 5, 0])
    assert collision_ranks(codes, popularity).tolist() == [1, 0, 0, 2, 0]
    stats = collision_stats(codes)
    assert stats["unique_sids"] == 3
    assert stats["max_items_per_sid"] == 3
    assert math.isclose(stats["collision_rate"], 2 / 5)
