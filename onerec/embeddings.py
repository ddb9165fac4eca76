"""Item embeddings that fuse content features with a collaborative signal.

The tokenizer clusters these vectors, so items that look alike *and* items that the same
people consume should share SID prefixes. The choice, and why:

* **Content part.** PCA of the standardised content vectors (numpy SVD): cheap, exact and
  applicable to a brand-new item with no interactions.
* **Collaborative part.** Items consumed within ``window`` steps of each other by the same
  user co-occur. Their positive pointwise mutual information (PPMI, with the usual 0.75
  context smoothing) is factorised by a truncated SVD (scipy ``svds``): the
  count-based equivalent of item2vec's skip-gram with negative sampling (Levy & Goldberg,
  2014), but deterministic and a few seconds on a CPU.
* **Fusion.** Each part is L2-normalised, scaled by the square root of its weight and
  concatenated, so the squared distance between two items is the weighted sum of their
  content and collaborative cosine distances. Items with no interactions (new items)
  have a zero collaborative part and are placed by content alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

log = logging.getLogger(__name__)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-12)


def cooccurrence(
    user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, window: int
) -> sp.csr_matrix:
    """Symmetric item-item counts of pairs at most ``window`` events apart in one history.

    ``user_idx``/``item_idx`` must be sorted by (user, time), as the event schema is.
    """
    rows, cols = [], []
    for offset in range(1, window + 1):  # a handful of vectorised shifts, not a loop over events
        same = user_idx[offset:] == user_idx[:-offset]
        a, b = item_idx[:-offset][same], item_idx[offset:][same]
        keep = a != b
        rows += [a[keep], b[keep]]
        cols += [b[keep], a[keep]]
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    counts = sp.coo_matrix((np.ones(len(r), np.float64), (r, c)), shape=(n_items, n_items))
    return counts.tocsr()  # duplicates are summed


def ppmi(counts: sp.csr_matrix, context_smoothing: float = 0.75) -> sp.csr_matrix:
    """Positive PMI of a co-occurrence matrix, keeping its sparsity."""
    total = counts.sum()
    if total == 0:
        return counts.copy()
    row = np.asarray(counts.sum(axis=1)).ravel()
    ctx = np.asarray(counts.sum(axis=0)).ravel() ** context_smoothing
    ctx_p = ctx / ctx.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data / total) - np.log(row[coo.row] / total) - np.log(ctx_p[coo.col])
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def collaborative_factors(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    n_items: int,
    dim: int = 32,
    window: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """(n_items, dim) factors of the PPMI matrix; zero rows for items never co-consumed."""
    matrix = ppmi(cooccurrence(user_idx, item_idx, n_items, window))
    k = min(dim, n_items - 2)
    out = np.zeros((n_items, dim), np.float32)
    if k < 1 or matrix.nnz == 0:
        return out
    v0 = np.random.default_rng(seed).random(n_items)
    u, s, _ = svds(matrix, k=k, v0=v0)
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    u *= np.sign(u[np.abs(u).argmax(axis=0), np.arange(k)])  # fix the SVD's sign ambiguity
    out[:, :k] = u * np.sqrt(s)
    return out


@dataclass
class ItemEmbedder:
    """Maps content vectors (and, when known, collaborative factors) to item embeddings."""

    content_mean: np.ndarray  # (d_in,)
    content_scale: np.ndarray  # (d_in,)
    content_basis: np.ndarray  # (d_in, content_dim)
    collab_dim: int
    content_weight: float = 0.5

    @property
    def dim(self) -> int:
        return self.content_basis.shape[1] + self.collab_dim

    @classmethod
    def fit(
        cls,
        content: np.ndarray,
        content_dim: int = 32,
        collab_dim: int = 32,
        content_weight: float = 0.5,
    ) -> ItemEmbedder:
        """PCA of the standardised content vectors."""
        x = np.asarray(content, np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        _, _, vt = np.linalg.svd((x - mean) / scale, full_matrices=False)
        basis = np.zeros((x.shape[1], content_dim))
        k = min(content_dim, vt.shape[0])
        basis[:, :k] = vt[:k].T
        return cls(mean, scale, basis, collab_dim, content_weight)

    def embed(self, content: np.ndarray, collab: np.ndarray | None = None) -> np.ndarray:
        """(n, dim) float32 embeddings; ``collab=None`` means new items with no interactions."""
        c = _unit_rows(
            ((np.asarray(content, np.float64) - self.content_mean) / self.content_scale)
            @ self.content_basis
        )
        if collab is None:
            collab = np.zeros((len(c), self.collab_dim))
        b = _unit_rows(np.asarray(collab, np.float64))
        parts = [np.sqrt(self.content_weight) * c, np.sqrt(1.0 - self.content_weight) * b]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            content_mean=self.content_mean,
            content_scale=self.content_scale,
            content_basis=self.content_basis,
            collab_dim=self.collab_dim,
            content_weight=self.content_weight,
        )

    @classmethod
    def load(cls, path: str | Path) -> ItemEmbedder:
        with np.load(path) as z:
            return cls(
                z["content_mean"],
                z["content_scale"],
                z["content_basis"],
                int(z["collab_dim"]),
                float(z["content_weight"]),
            )


def item_embeddings(
    content: np.ndarray,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    content_dim: int = 32,
    collab_dim: int = 32,
    content_weight: float = 0.5,
    seed: int = 0,
) -> tuple[ItemEmbedder, np.ndarray]:
    """Fit the embedder on a catalog and its event log; returns it and the (I, dim) table."""
    embedder = ItemEmbedder.fit(content, content_dim, collab_dim, content_weight)
    collab = collaborative_factors(user_idx, item_idx, len(content), collab_dim, seed=seed)
    log.info("item embeddings: %d items, dim %d", len(content), embedder.dim)
    return embedder, embedder.embed(content, collab)
