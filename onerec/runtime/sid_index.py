"""From a decoded SID to its items: several items may share one SID (a collision), and
the catalog's collision rank orders them. Offline evaluation and the front end expand
beams with the same index, so both rank the same items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec.runtime.trie import SIDTrie


@dataclass(frozen=True)
class SIDIndex:
    """Leaf (unique SID) -> items, CSR, items in collision-rank order."""

    trie: SIDTrie
    offsets: np.ndarray  # (S + 1,)
    items: np.ndarray  # (N,) item rows grouped by leaf
    sizes: np.ndarray  # (S,) items per leaf, kept so requests never recompute it

    @classmethod
    def build(cls, sids: np.ndarray, collision_rank: np.ndarray, codebook_size: int) -> SIDIndex:
        trie = SIDTrie.from_codes(sids, codebook_size)
        leaf = trie.leaf_of(sids)
        order = np.lexsort((collision_rank, leaf))
        offsets = np.searchsorted(leaf[order], np.arange(len(trie) + 1))
        return cls(trie, offsets, order, np.diff(offsets))

    def expand(self, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, W) ranked leaves (-1 = none) -> (B, M) ranked items, and the column of
        ``leaves`` each came from; both -1 padded."""
        b, w = leaves.shape
        flat = leaves.ravel()
        counts = np.where(flat >= 0, self.sizes[np.maximum(flat, 0)], 0)
        per_row = counts.reshape(b, w).sum(1)
        width = max(1, int(per_row.max(initial=0)))
        starts = np.repeat(self.offsets[np.maximum(flat, 0)], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        items = self.items[starts + within]
        row = np.repeat(np.repeat(np.arange(b), w), counts)
        col = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        out = np.full((b, width), -1, np.int64)
        out[row, col] = items
        source = np.full((b, width), -1, np.int64)
        source[row, col] = np.repeat(np.tile(np.arange(w), b), counts)
        return out, source
