"""Offline decoding and evaluation of the OneRec model under the leave-last-out protocol.

:func:`recommend_items` is the offline reference of what serving does: build the four
pathways from the history before the held-out event, encode once, run the trie-constrained
beam search, and expand each SID into its items in collision-rank order (the catalog
rule). :func:`onerec_ranks` turns those ranked lists, seen items removed, into per-user
target ranks, exactly as :mod:`onerec.metrics` does for the score-based baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from onerec.beam_search import constrained_beam_search
from onerec.data.schema import Dataset
from onerec.lifelong import compress_history
from onerec.metrics import Split, filter_topk_seen, topk_ranks
from onerec.model import OneRec
from onerec.pathways import EventArrays, build_pathways, collate
from onerec.train import Catalog
from onerec.trie import SIDTrie


@dataclass(frozen=True)
class SIDIndex:
    """Leaf (unique SID) -> items, CSR, items in collision-rank order."""

    trie: SIDTrie
    offsets: np.ndarray  # (S + 1,)
    items: np.ndarray  # (N,) item rows grouped by leaf

    @classmethod
    def build(cls, sids: np.ndarray, collision_rank: np.ndarray, codebook_size: int) -> SIDIndex:
        trie = SIDTrie.from_codes(sids, codebook_size)
        leaf = trie.leaf_of(sids)
        order = np.lexsort((collision_rank, leaf))
        offsets = np.searchsorted(leaf[order], np.arange(len(trie) + 1))
        return cls(trie, offsets, order)

    def expand(self, leaves: np.ndarray) -> np.ndarray:
        """(B, W) ranked leaves (-1 = none) -> (B, M) ranked items, -1 padded."""
        b, w = leaves.shape
        flat = leaves.ravel()
        counts = np.where(flat >= 0, self.offsets[flat + 1] - self.offsets[np.maximum(flat, 0)], 0)
        per_row = counts.reshape(b, w).sum(1)
        width = max(1, int(per_row.max(initial=0)))
        starts = np.repeat(self.offsets[np.maximum(flat, 0)], counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        items = self.items[starts + within]
        row = np.repeat(np.repeat(np.arange(b), w), counts)
        col = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        out = np.full((b, width), -1, np.int64)
        out[row, col] = items
        return out


@torch.no_grad()
def recommend_items(
    model: OneRec,
    ds: Dataset,
    catalog: Catalog,
    index: SIDIndex,
    split: Split,
    rows: np.ndarray,
    beam_width: int,
    events: EventArrays | None = None,
) -> np.ndarray:
    """Ranked item rows (len(rows), M) for the split rows, -1 padded, seen items included."""
    events = events or EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    cfg = model.cfg
    samples = []
    for r in rows:  # request preparation, one user each; the model runs batched below
        u = int(split.users[r])
        h = events.user(u)
        past = h.head(int(split.history_end[r] - split.history_start[r]))
        compressed = compress_history(catalog.vectors[past.items], cfg.lifelong_len)
        now = int(h.timestamp[len(past)])
        samples.append(build_pathways(past, now, static[u], catalog.vectors, cfg, compressed))
    inputs = {k: torch.from_numpy(v) for k, v in collate(samples).items()}
    memory, keep = model.encoder(**inputs)
    kv = model.decoder.cross_kv(memory)

    def step(tokens: np.ndarray) -> np.ndarray:
        return model.decoder.step(torch.from_numpy(tokens), kv, keep).numpy()

    result = constrained_beam_search(step, len(rows), beam_width, index.trie)
    leaves = np.where(
        result.valid,
        index.trie.leaf_of(result.sids.reshape(-1, cfg.sid_levels)).reshape(result.valid.shape),
        -1,
    )
    return index.expand(leaves)


def onerec_ranks(
    model: OneRec,
    ds: Dataset,
    catalog: Catalog,
    index: SIDIndex,
    split: Split,
    beam_width: int = 128,
    batch_size: int = 32,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Target ranks (len(rows),) in the beam-search recommendations, seen items removed."""
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    events = EventArrays.from_dataset(ds)
    ranked = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        items = recommend_items(model, ds, catalog, index, split, chunk, beam_width, events)
        ranked.append(filter_topk_seen(items, split, ds, chunk)[:, :50])
    width = max(r.shape[1] for r in ranked)
    topk = np.concatenate(
        [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r in ranked]
    )
    return topk_ranks(topk, split.target_items[rows])
