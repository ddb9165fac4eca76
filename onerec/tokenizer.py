"""Balanced residual k-means (OneRec's RQ-KMeans): item embeddings -> semantic IDs.

Level ``l`` clusters the residuals left by levels ``0..l-1`` into ``K`` clusters, so an
item's SID ``(c0, c1, c2)`` is a coarse-to-fine address. Every level is *balanced*: no
cluster holds more than ``ceil(N / K)`` items, which keeps the decoder's output classes
evenly used and stops one giant cluster from swallowing the catalog.

Balanced assignment (:func:`balanced_assign`) is a vectorised capacity-constrained greedy:
each unassigned item proposes to its nearest cluster that still has room; each cluster
accepts its closest proposers up to its remaining capacity; the rest propose to their next
choice. Candidates are each item's ``m`` nearest centroids (faiss), and the few items that
exhaust them are finished against all clusters that still have room. Centroids are then
the means of their members (Lloyd step), which guarantees that quantisation error never
rises from one level to the next.

**Collisions.** Items that share a full SID are ranked inside it by popularity
(interactions, descending; then catalog order). Rank 0 is the SID's primary item. The
catalog maps a SID to all its items in that order, so none is unreachable; the collision
rate is the share of items that are not their SID's primary.

**New items** are tokenized with the saved codebooks by nearest centroid per level, with no
retraining and no balancing, so the catalog can grow while the model serves.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)


# Leaves of the full trie per item, for the codebook size rule below.
LEAVES_PER_ITEM = 16


def codebook_size_for(n_items: int, levels: int) -> int:
    """Codes per level for ``n_items``: the smallest power of two, at least 8, whose
    ``levels``-deep trie has ``LEAVES_PER_ITEM`` leaves per item.

    One rule for every data set instead of a size tuned to each by hand: 64 codes for 10k
    items, 128 for 100k, 256 for a million. Coarse codes give each code more training
    targets; the price is that some items share a full SID, which costs little because
    every item of a decoded SID is a candidate (:mod:`onerec.runtime.sid_index`) and the
    ranking stage orders them. docs/data.md has the collision rates.
    """
    k = 8
    while k**levels < LEAVES_PER_ITEM * n_items:
        k *= 2
    return k


@dataclass(frozen=True)
class TokenizerConfig:
    """``codebook_size`` None: :func:`codebook_size_for` the items fitted."""

    levels: int = 3
    codebook_size: int | None = None
    iters: int = 10
    candidates: int = 16
    seed: int = 0


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(N, K) squared Euclidean distances."""
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)
    return np.maximum(d, 0.0)


def nearest(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest centroids of each row, closest first: (dist, index), each (N, k)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return dist, idx.astype(np.int64)


def _greedy_rounds(cand: np.ndarray, cost: np.ndarray, room: np.ndarray) -> np.ndarray:
    """Assign rows to candidate clusters under the capacities ``room`` (updated in place).

    ``cand``/``cost`` are (n, m), ordered best first. Returns (n,) cluster ids, -1 where a
    row's candidates all filled up.
    """
    n, m = cand.shape
    assign = np.full(n, -1, np.int64)
    ptr = np.zeros(n, np.int64)
    active = np.arange(n)
    while active.size:
        # Skip candidates that are already full.
        while True:
            full = room[cand[active, np.minimum(ptr[active], m - 1)]] <= 0
            full &= ptr[active] < m
            if not full.any():
                break
            ptr[active[full]] += 1
        active = active[ptr[active] < m]
        if not active.size:
            break
        choice = cand[active, ptr[active]]
        order = np.lexsort((cost[active, ptr[active]], choice))
        sorted_choice = choice[order]
        first = np.searchsorted(sorted_choice, sorted_choice, side="left")
        rank = np.arange(order.size) - first
        accepted = order[rank < room[sorted_choice]]
        winners = active[accepted]
        assign[winners] = choice[accepted]
        np.subtract.at(room, choice[accepted], 1)
        losers = np.setdiff1d(active, winners, assume_unique=True)
        ptr[losers] += 1
        active = losers
    return assign


def balanced_assign(
    x: np.ndarray, centroids: np.ndarray, cap: int, candidates: int = 16
) -> np.ndarray:
    """Assign every row of ``x`` to a centroid, with at most ``cap`` rows per centroid."""
    k = len(centroids)
    if cap * k < len(x):
        raise ValueError(f"capacity {cap} x {k} clusters cannot hold {len(x)} items")
    room = np.full(k, cap, np.int64)
    dist, cand = nearest(x, centroids, min(candidates, k))
    assign = _greedy_rounds(cand, dist, room)
    left = np.flatnonzero(assign < 0)
    if left.size:  # rare: finish against every cluster that still has room
        open_clusters = np.flatnonzero(room > 0)
        d = _sq_dist(x[left], centroids[open_clusters])
        order = np.argsort(d, axis=1, kind="stable")
        cand_left = open_clusters[order]
        assign[left] = _greedy_rounds(cand_left, np.take_along_axis(d, order, 1), room)
    return assign


def _means(x: np.ndarray, assign: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster's members; an empty cluster keeps its previous centroid."""
    k = len(previous)
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, assign, x)
    out = previous.astype(np.float64).copy()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def balanced_kmeans(
    x: np.ndarray, k: int, iters: int = 10, seed: int = 0, candidates: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced k-means: (centroids (k, d), assignment (N,)) with every cluster <= ceil(N/k)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    cap = math.ceil(n / k)
    rng = np.random.default_rng(seed)
    if n <= k:
        centroids = np.concatenate([x, x[rng.integers(0, n, k - n)]]).astype(np.float64)
        assign = np.arange(n)
        return centroids, assign
    km = faiss.Kmeans(d, k, niter=10, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    centroids = km.centroids.astype(np.float64)
    assign = np.full(n, -1)
    for _ in range(iters):
        new = balanced_assign(x, centroids, cap, candidates)
        centroids = _means(x, new, centroids)
        if np.array_equal(new, assign):
            break
        assign = new
    return centroids, assign


@dataclass
class SemanticTokenizer:
    """Codebooks of a fitted RQ-KMeans: ``codebooks[l]`` is level ``l``'s (K, d) centroids."""

    config: TokenizerConfig
    codebooks: np.ndarray  # (L, K, d) float32

    @classmethod
    def fit(
        cls, x: np.ndarray, config: TokenizerConfig | None = None, progress: bool = True
    ) -> tuple[SemanticTokenizer, np.ndarray, dict[str, Any]]:
        """Fit on (N, d) embeddings. Returns the tokenizer, the (N, L) codes and statistics."""
        cfg = config or TokenizerConfig()
        if cfg.codebook_size is None:
            cfg = replace(cfg, codebook_size=codebook_size_for(len(x), cfg.levels))
        residual = np.asarray(x, np.float64)
        codebooks, codes = [], []
        stats: dict[str, Any] = {"items": len(residual), "levels": []}
        base_error = float((residual**2).sum(1).mean())
        for level in tqdm(range(cfg.levels), desc="rq-kmeans levels", disable=not progress):
            centroids, assign = balanced_kmeans(
                residual, cfg.codebook_size, cfg.iters, cfg.seed + level, cfg.candidates
            )
            residual = residual - centroids[assign]
            sizes = np.bincount(assign, minlength=cfg.codebook_size)
            stats["levels"].append(
                {
                    "level": level,
                    "cluster_min": int(sizes.min()),
                    "cluster_max": int(sizes.max()),
                    "capacity": math.ceil(len(residual) / cfg.codebook_size),
                    "quantisation_error": float((residual**2).sum(1).mean()),
                }
            )
            codebooks.append(centroids.astype(np.float32))
            codes.append(assign)
        stats["input_energy"] = base_error
        return cls(cfg, np.stack(codebooks)), np.stack(codes, axis=1), stats

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(N, L) SIDs by nearest centroid per level: for new items, no retraining."""
        residual = np.asarray(x, np.float32).copy()
        codes = np.empty((len(residual), len(self.codebooks)), np.int64)
        for level, book in enumerate(self.codebooks):
            _, idx = nearest(residual, book, 1)
            codes[:, level] = idx[:, 0]
            residual -= book[idx[:, 0]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruction: the sum of each level's centroid."""
        return sum(self.codebooks[level][codes[:, level]] for level in range(codes.shape[1]))

    def save(self, path: str | Path) -> None:
        np.savez(path, codebooks=self.codebooks, config=json.dumps(asdict(self.config)))

    @classmethod
    def load(cls, path: str | Path) -> SemanticTokenizer:
        with np.load(path) as z:
            return cls(TokenizerConfig(**json.loads(str(z["config"]))), z["codebooks"])


def collision_stats(codes: np.ndarray) -> dict[str, float]:
    """How many items share a full SID with another item."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.ravel()] > 1
    return {
        "unique_sids": len(counts),
        "collision_rate": float(1.0 - len(counts) / len(codes)) if len(codes) else 0.0,
        "items_in_shared_sids": float(shared.mean()) if len(codes) else 0.0,
        "max_items_per_sid": int(counts.max()) if len(counts) else 0,
    }
