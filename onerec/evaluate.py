"""Offline decoding and evaluation of the OneRec model under the leave-last-out protocol.

:func:`candidates` and :meth:`Candidates.ranked` are the offline reference of what serving
does: build the four pathways from the history before the held-out event, encode once,
run the trie-constrained beam search, expand each SID into its items in collision-rank
order (the catalog rule), and order those items by the model's ranking stage
(:mod:`onerec.runtime.ranking`, weighted as :func:`fit_rank_weight` fitted it).
:func:`beam_ranks` turns those ranked lists, seen items removed, into per-user target
ranks, exactly as :mod:`onerec.metrics` does for the score-based baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from onerec.data.schema import Dataset
from onerec.event_arrays import EventArrays
from onerec.metrics import Split, filter_topk_seen, metrics_from_ranks, topk_ranks
from onerec.model import OneRec, TorchSearch
from onerec.runtime.beam_search import constrained_beam_search
from onerec.runtime.lifelong import compress_history
from onerec.runtime.pathways import build_pathways, collate
from onerec.runtime.ranking import FINAL_EXPAND, rank_candidates
from onerec.runtime.sid_index import SIDIndex
from onerec.train import ItemTables

# 0: beam order alone; 1: product of experts; 32: mostly the head's order.
RANK_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass(frozen=True)
class Candidates:
    """The beam's items for a batch of users, before the ranking stage orders them."""

    items: np.ndarray  # (B, M) item rows in beam order, -1 padded, seen items included
    sid_logp: np.ndarray  # (B, M) the log-probability of each item's SID
    users: np.ndarray  # (B, d) the ranking stage's user vectors, before its weight

    def ranked(self, table: np.ndarray, weight: float) -> np.ndarray:
        """(B, M) items in ranking-stage order (:func:`onerec.runtime.ranking.rank_candidates`)."""
        tokens = np.where(self.items >= 0, self.items + 1, -1)
        order, _ = rank_candidates(weight * self.users, table, tokens, self.sid_logp)
        return np.take_along_axis(self.items, order, axis=1)


@torch.no_grad()
def candidates(
    model: OneRec,
    ds: Dataset,
    item_tables: ItemTables,
    index: SIDIndex,
    split: Split,
    rows: np.ndarray,
    beam_width: int,
    events: EventArrays | None = None,
    final_expand: int = FINAL_EXPAND,
) -> Candidates:
    """The split rows' beams, as items, with what the ranking stage needs."""
    events = events or EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    cfg = model.cfg
    samples = []
    for r in rows:  # request preparation, one user each; the model runs batched below
        u = int(split.users[r])
        h = events.user(u)
        past = h.head(int(split.history_end[r] - split.history_start[r]))
        compressed = compress_history(item_tables.vectors[past.items], cfg.lifelong_len)
        now = int(h.timestamp[len(past)])
        samples.append(build_pathways(past, now, static[u], item_tables.vectors, cfg, compressed))
    inputs = {k: torch.from_numpy(v) for k, v in collate(samples).items()}
    memory, keep = model.encoder(**inputs)
    kv = model.decoder.cross_kv(memory)

    search = TorchSearch(model.decoder, keep, kv)
    result = constrained_beam_search(
        search, len(rows), beam_width, index.trie, final_expand=final_expand
    )
    leaves = np.where(
        result.valid,
        index.trie.leaf_of(result.sids.reshape(-1, cfg.sid_levels)).reshape(result.valid.shape),
        -1,
    )
    items, source = index.expand(leaves)
    sid_logp = np.take_along_axis(result.scores, np.maximum(source, 0), axis=1)
    users = model.next_item.user(inputs["short_items"]).numpy()
    return Candidates(items, sid_logp, users)


def served_ranking(model: OneRec) -> tuple[np.ndarray, float]:
    """The ranking stage's item table and fitted weight, as served: the arguments
    of :meth:`Candidates.ranked` that reproduce the server's order."""
    return model.next_item.served_table().numpy(), float(model.next_item.rank_weight)


def fit_rank_weight(
    model: OneRec,
    ds: Dataset,
    item_tables: ItemTables,
    index: SIDIndex,
    split: Split,
    beam_width: int = 128,
) -> dict[float, float]:
    """Set the ranking stage's weight to the one of :data:`RANK_WEIGHTS` with the best
    NDCG@10 on ``split`` (validation events, never the test's); returns each weight's.

    How much the next-item head should count depends on the data and on how long each
    stage trained, so it is fitted, not set (the weights fits picked: docs/findings.md).
    """
    ranks, _ = beam_ranks(
        model, ds, item_tables, index, split, np.arange(len(split)), beam_width, RANK_WEIGHTS
    )
    ndcg = {w: metrics_from_ranks(r, ks=(10,))["ndcg@10"] for w, r in ranks.items()}
    best = max(RANK_WEIGHTS, key=lambda w: (ndcg[w], -abs(w - 1.0)))  # ties: nearest 1
    model.next_item.rank_weight.fill_(best)
    return ndcg


def beam_ranks(
    model: OneRec,
    ds: Dataset,
    item_tables: ItemTables,
    index: SIDIndex,
    split: Split,
    rows: np.ndarray,
    beam_width: int,
    weights: tuple[float, ...],
    final_expand: int = FINAL_EXPAND,
    batch_size: int = 32,
) -> tuple[dict[float, np.ndarray], np.ndarray]:
    """Target ranks of ``rows`` among every item the beams reached, seen items removed,
    under each ranking-stage weight, from one beam search; and how many items that was per
    row. A target no beam reached is a ``MISS`` under every weight: the candidates' recall
    bounds what any ranking stage can do."""
    events = EventArrays.from_dataset(ds)
    table, _ = served_ranking(model)
    ranks: dict[float, list[np.ndarray]] = {w: [] for w in weights}
    counts = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        found = candidates(
            model, ds, item_tables, index, split, chunk, beam_width, events, final_expand
        )
        targets = split.target_items[chunk]
        for w in weights:
            ranked = filter_topk_seen(found.ranked(table, w), split, ds, chunk)
            ranks[w].append(topk_ranks(ranked, targets))
        counts.append((ranked >= 0).sum(axis=1))
    return {w: np.concatenate(r) for w, r in ranks.items()}, np.concatenate(counts)
