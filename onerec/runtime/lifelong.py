"""Lifelong-history compression: up to 100,000 interactions -> at most ``budget`` items.

The trainer and the online front end call this same function, so the model sees the same
kind of summary offline and online.

Scheme (two-level hierarchical k-means, after the OneRec report's ``⌊∛|D|⌋`` rule):

1. Cluster the history's item embeddings into ``k1 = ⌊∛n⌋`` coarse clusters.
2. Split each coarse cluster ``c`` into ``k_c`` fine clusters, where the ``budget`` is
   shared out in proportion to cluster size (largest remainders first), so the total is
   exactly ``budget`` and dense regions of the history keep more detail.
3. Keep, for each fine cluster, the history item nearest its centroid, and its cluster's
   size as a weight.

Representatives come back in time order (their position in the history). A history no
longer than ``budget`` is returned whole with weight 1.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import faiss
import numpy as np

DEFAULT_BUDGET = 2000


@dataclass(frozen=True)
class Compressed:
    """Positions in the history of the kept items (ascending) and how many each stands for."""

    positions: np.ndarray  # (m,) int64, ascending
    weights: np.ndarray  # (m,) int64, sums to the history length


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Cluster label of each row (faiss k-means; k >= len(x) means every row alone)."""
    if k >= len(x):
        return np.arange(len(x))
    if k <= 1:
        return np.zeros(len(x), np.int64)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.ravel().astype(np.int64)


def _share(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over clusters in proportion to size: >= 1 each, <= size each.

    Needs ``len(sizes) <= budget < sizes.sum()``, which the caller guarantees.
    """
    quota = sizes * budget / sizes.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), 1, sizes)
    spare = budget - alloc.sum()
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while spare > 0:
        room = alloc[order] < sizes[order]
        give = order[room][:spare]
        if not give.size:
            break
        alloc[give] += 1
        spare -= give.size
    while spare < 0:  # the floor of 1 per cluster overshot: take from the largest allocations
        take = np.argsort(-alloc, kind="stable")[:-spare]
        take = take[alloc[take] > 1]
        alloc[take] -= 1
        spare += take.size
    return alloc


def compress_history(
    embeddings: np.ndarray, budget: int = DEFAULT_BUDGET, seed: int = 0, niter: int = 8
) -> Compressed:
    """Compress an (n, d) history of item embeddings to at most ``budget`` representatives."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(x)
    if n <= budget:
        return Compressed(np.arange(n, dtype=np.int64), np.ones(n, np.int64))
    # Never more coarse clusters than the budget, so each can keep at least one item.
    k1 = min(budget, max(1, math.floor(round(n ** (1 / 3), 9))))
    coarse = _kmeans(x, k1, seed, niter)
    sizes = np.bincount(coarse)
    nonempty = np.flatnonzero(sizes)
    alloc = np.zeros_like(sizes)
    alloc[nonempty] = _share(sizes[nonempty], budget)

    positions, weights = [], []
    members_by_cluster = np.argsort(coarse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for c in nonempty:  # ~∛n coarse clusters (46 at 100k), each clustered in one call
        members = members_by_cluster[bounds[c] : bounds[c + 1]]
        fine = _kmeans(x[members], int(alloc[c]), seed + int(c) + 1, niter)
        k = int(fine.max()) + 1
        counts = np.bincount(fine, minlength=k)
        centroids = np.zeros((k, x.shape[1]), np.float64)
        np.add.at(centroids, fine, x[members])
        centroids /= np.maximum(counts, 1)[:, None]
        dist = ((x[members] - centroids[fine]) ** 2).sum(1)
        # Nearest member of each fine cluster: sort by (cluster, distance), take the first.
        order = np.lexsort((dist, fine))
        first = order[np.searchsorted(fine[order], np.flatnonzero(counts))]
        positions.append(members[first])
        weights.append(counts[counts > 0])
    pos = np.concatenate(positions)
    w = np.concatenate(weights)
    order = np.argsort(pos)
    return Compressed(pos[order].astype(np.int64), w[order].astype(np.int64))


# How many distinct seen items a user's record keeps, the most recent first: the search
# excludes them all, so this bounds the exclusion a request carries (docs/operations.md).
SEEN_LIMIT = 8192


@dataclass(frozen=True)
class LifelongRecord:
    """A user's lifelong pathway, compressed, and the items they have seen: kept beside
    their events in the feature store, so a request reads it instead of running k-means.

    It covers the history up to the store's append mark ``mark`` (``version`` events);
    events appended since are read as a delta (their items join ``seen`` exactly), and a
    background refresh recompresses once enough have arrived.
    """

    mark: int
    version: int
    items: np.ndarray  # (R,) model item index of each representative, time order
    timestamp: np.ndarray  # (R,) ms
    weight: np.ndarray  # (R,) how many history items each stands for
    seen: np.ndarray  # (S,) distinct model indices, the most recent SEEN_LIMIT
    seen_new: np.ndarray  # (U,) str: ids of seen items the model does not know

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(
            out,
            counts=np.array([self.mark, self.version], np.int64),
            items=self.items.astype(np.int64),
            timestamp=self.timestamp.astype(np.int64),
            weight=self.weight.astype(np.int64),
            seen=self.seen.astype(np.int64),
            seen_new=self.seen_new.astype(str),
        )
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LifelongRecord:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            mark, version = (int(v) for v in z["counts"])
            return cls(
                mark, version, z["items"], z["timestamp"], z["weight"], z["seen"], z["seen_new"]
            )


def recent_distinct(items: np.ndarray, limit: int = SEEN_LIMIT) -> np.ndarray:
    """The ``limit`` most recently seen distinct items of a time-ordered ``items``, most
    recent first."""
    newest_first = items[::-1]
    distinct, first = np.unique(newest_first, return_index=True)
    return distinct[np.argsort(first, kind="stable")][:limit]


def lifelong_record(
    items: np.ndarray,
    timestamp: np.ndarray,
    vectors: np.ndarray,
    budget: int,
    mark: int,
    seen_new: np.ndarray,
) -> LifelongRecord:
    """The record of a whole time-ordered history of model item indices (``len(vectors)``
    for an item the model does not know): k-means over the known items' vectors."""
    known = np.flatnonzero(items < len(vectors))
    kept = known[:0]
    weight = np.zeros(0, np.int64)
    if len(known):
        c = compress_history(vectors[items[known]], budget=budget)
        kept, weight = known[c.positions], c.weights
    return LifelongRecord(
        mark,
        len(items),
        items[kept].astype(np.int64),
        timestamp[kept].astype(np.int64),
        weight,
        recent_distinct(items[known]),
        np.asarray(seen_new, str),
    )
