"""The benchmark's naive baseline computes what the served search computes."""

from __future__ import annotations

import numpy as np
import torch

from onerec.model import OneRec
from onerec.naive_serving import NaiveServing, prefix_table
from onerec.runtime.beam_search import constrained_beam_search
from onerec.runtime.config import OneRecConfig
from onerec.runtime.trie import SIDTrie
from server.triton_client import empty_pathways

CFG = OneRecConfig(
    n_items=80,
    static_cardinalities=(4,),
    codebook_size=8,
    d_model=16,
    n_heads=2,
    d_ff=32,
    d_expert=32,
    positive_len=16,
    lifelong_len=30,
    n_queries=4,
)


def test_prefix_table_lists_each_prefixs_children() -> None:
    table = prefix_table(np.array([[1, 2, 3], [1, 2, 5], [0, 7, 7]]))
    assert table[()] == [0, 1] and table[(1,)] == [2] and table[(1, 2)] == [3, 5]


def test_naive_beams_equal_the_vectorised_search() -> None:
    torch.manual_seed(0)
    n = CFG.n_items + 2
    sids = torch.randint(0, CFG.codebook_size, (n, CFG.sid_levels))
    model = OneRec(
        CFG,
        torch.randn(n, CFG.item_vector_dim),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        sids,
    ).eval()
    item_tables = sids[1:-1].numpy()
    naive = NaiveServing(model, item_tables)
    trie = SIDTrie.from_codes(item_tables, CFG.codebook_size)
    pathways = empty_pathways(CFG)
    pathways["short_items"] = np.array([3, 9, 27])
    for key in ("short_gap", "short_watch"):
        pathways[key] = np.array([1, 2, 3])
    pathways["short_flags"] = np.zeros((3, 6), np.float32)
    with torch.no_grad():
        inputs = {k: torch.from_numpy(v[None]) for k, v in pathways.items()}
        memory, keep = model.encoder(**inputs)
        kv = model.decoder.cross_kv(memory)

        def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            return model.decoder.step(torch.from_numpy(tokens), kv, keep).numpy()

        for width in (1, 5, 40):
            ref = constrained_beam_search(step, 1, width, trie)
            got = naive.recommend(pathways, width)
            n_valid = int(ref.valid[0].sum())
            assert len(got) == n_valid
            assert [s for s, _ in got] == [tuple(s) for s in ref.sids[0, :n_valid].tolist()]
            np.testing.assert_allclose([v for _, v in got], ref.scores[0, :n_valid], atol=1e-4)
