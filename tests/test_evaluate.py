"""Offline decoding: SIDs expand to real items by the collision rule; metrics are sane."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec.data.synthetic import SyntheticConfig, generate
from onerec.embeddings import item_embeddings
from onerec.evaluate import (
    RANK_WEIGHTS,
    beam_ranks,
    candidates,
    fit_rank_weight,
    served_ranking,
)
from onerec.experiment import validation_split
from onerec.metrics import MISS, leave_last_out, metrics_from_ranks
from onerec.runtime.catalog import collision_ranks
from onerec.runtime.sid_index import SIDIndex
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig
from onerec.train import ItemTables, build_model, model_config


def test_expand_follows_collision_rank_and_pads() -> None:
    sids = np.array([[0, 0, 1], [0, 0, 1], [1, 2, 3], [0, 0, 1]])
    index = SIDIndex.build(sids, collision_rank=np.array([1, 0, 0, 2]), codebook_size=4)
    leaf_a, leaf_b = index.trie.leaf_of(np.array([[0, 0, 1], [1, 2, 3]]))
    out, source = index.expand(np.array([[leaf_b, leaf_a], [leaf_a, -1], [-1, -1]]))
    assert out.tolist() == [[2, 1, 0, 3], [1, 0, 3, -1], [-1, -1, -1, -1]]
    assert source.tolist() == [[0, 1, 1, 1], [0, 0, 0, -1], [-1, -1, -1, -1]]


@pytest.fixture(scope="module")
def tiny():
    ds = generate(SyntheticConfig(n_users=30, n_items=120, max_history=300, min_history=10, seed=5))
    _, emb = item_embeddings(ds.item_content, ds.user_index(), ds.item_index(), 8, 8)
    _, codes, _ = SemanticTokenizer.fit(emb, TokenizerConfig(codebook_size=8), progress=False)
    item_tables = ItemTables.build(ds, emb, codes)
    sizes = {"d_model": 32, "n_heads": 2, "d_ff": 64, "d_expert": 32, "n_queries": 8}
    cfg = model_config(ds, item_tables, 8, lifelong_len=50, positive_len=32, **sizes)
    torch.manual_seed(0)
    model = build_model(cfg, item_tables).eval()
    pop = np.bincount(ds.item_index(), minlength=ds.n_items)
    index = SIDIndex.build(codes, collision_ranks(codes, pop), 8)
    return ds, item_tables, model, index


def test_random_weights_at_wide_beams_only_return_real_items(tiny) -> None:
    ds, item_tables, model, index = tiny
    split = leave_last_out(ds)
    rows = np.arange(6)
    found = candidates(model, ds, item_tables, index, split, rows, beam_width=512)
    items = found.ranked(*served_ranking(model))
    real = items[items >= 0]
    assert real.size and real.max() < ds.n_items
    # Every item of the catalog is reachable: with 512 beams > 120 items, all come back.
    for row in items:
        kept = row[row >= 0]
        assert len(np.unique(kept)) == len(kept) == ds.n_items
        assert (row[len(kept) :] == -1).all()


def test_evaluate_gives_bounded_metrics(tiny) -> None:
    ds, item_tables, model, index = tiny
    split = leave_last_out(ds)
    weight = served_ranking(model)[1]
    found, counts = beam_ranks(
        model, ds, item_tables, index, split, np.arange(10), 32, (0.0, weight)
    )
    ranks = found[weight]
    assert ranks.shape == counts.shape == (10,)
    # A target no beam reached misses under every weight; the rest rank within the beams.
    np.testing.assert_array_equal(found[0.0] == MISS, ranks == MISS)
    assert (ranks[ranks != MISS] < counts[ranks != MISS]).all()
    metrics = metrics_from_ranks(ranks)
    assert set(metrics) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["recall@50"] >= metrics["recall@10"]


def test_ranking_weight_zero_keeps_the_beam_order_and_a_weight_reorders(tiny) -> None:
    ds, item_tables, model, index = tiny
    split = leave_last_out(ds)
    found = candidates(model, ds, item_tables, index, split, np.arange(4), beam_width=16)
    table = model.next_item.served_table().numpy()
    np.testing.assert_array_equal(found.ranked(table, 0.0), found.items)
    reordered = found.ranked(100.0 * table, 1.0)  # the head's scores large enough to matter
    assert not (reordered == found.items).all()
    assert (np.sort(reordered, axis=1) == np.sort(found.items, axis=1)).all()  # same items


def test_rank_weight_is_fitted_on_the_validation_events_and_served(tiny) -> None:
    """The fit picks the weight with the best validation NDCG@10 and stores it where
    export reads it: the user vector's scale."""
    ds, item_tables, model, index = tiny
    split = validation_split(ds)
    assert (split.history_end == leave_last_out(ds).history_end - 1).all()
    short = torch.randint(1, ds.n_items + 1, (2, 5))
    with torch.no_grad():
        unit = model.user(short)
    try:
        ndcg = fit_rank_weight(model, ds, item_tables, index, split, beam_width=16)
        assert set(ndcg) == set(RANK_WEIGHTS)
        weight = float(model.next_item.rank_weight)
        assert ndcg[weight] == max(ndcg.values())
        with torch.no_grad():
            torch.testing.assert_close(model.user(short), weight * unit)
    finally:
        model.next_item.rank_weight.fill_(1.0)
