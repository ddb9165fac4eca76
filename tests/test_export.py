"""ONNX export parity: ONNX Runtime (CPU) matches torch, and so does the beam search."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx as onnx_ir
import pytest
import torch

from onerec.export import export, parity
from onerec.model import OneRec
from onerec.runtime.beam_search import constrained_beam_search
from onerec.runtime.config import N_FLAGS, OneRecConfig
from onerec.runtime.onnx_runners import OnnxOneRec
from onerec.runtime.pathways import PATHWAY_INPUTS
from onerec.runtime.trie import SIDTrie

CFG = OneRecConfig(
    n_items=400,
    static_cardinalities=(7, 3),
    n_authors=20,
    n_tags=20,
    codebook_size=32,
    d_model=32,
    n_heads=2,
    d_ff=64,
    d_expert=48,
    positive_len=64,
    lifelong_len=200,
    n_queries=16,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    n = CFG.n_items + 2
    model = OneRec(
        CFG,
        torch.randn(n, CFG.item_vector_dim),
        torch.randint(0, CFG.n_authors + 1, (n,)),
        torch.randint(0, CFG.n_tags + 1, (n,)),
        torch.randint(0, CFG.codebook_size, (n, CFG.sid_levels)),
    ).eval()
    out = tmp_path_factory.mktemp("onnx")
    export(model, out)
    return model, OnnxOneRec(out, threads=1), out


def _pathways(b: int, s: int, p: int, life: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {
        "static": np.stack([rng.integers(0, 7, b), rng.integers(0, 3, b)], 1)
    }
    for prefix, n in (("short", s), ("pos", p)):
        items = rng.integers(1, CFG.n_items + 2, (b, n))
        items[:, n - n // 4 :] = 0  # trailing padding, as collate makes it
        out[f"{prefix}_items"] = items
        out[f"{prefix}_gap"] = rng.integers(1, 33, (b, n))
        out[f"{prefix}_watch"] = rng.integers(1, 10, (b, n))
        out[f"{prefix}_flags"] = rng.integers(0, 2, (b, n, N_FLAGS)).astype(np.float32)
    out["life_items"] = rng.integers(1, CFG.n_items + 2, (b, life))
    out["life_gap"] = rng.integers(1, 33, (b, life))
    out["life_weight"] = rng.integers(1, 18, (b, life))
    return {k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in out.items()}


@pytest.mark.parametrize(("b", "s", "p", "life"), [(1, 20, 64, 200), (5, 7, 13, 150)])
def test_encoder_and_steps_match_torch(exported, b: int, s: int, p: int, life: int) -> None:
    model, onnx, _ = exported
    inputs = _pathways(b, s, p, life, seed=b)
    keep, kv, user = onnx.encode(inputs)
    with torch.no_grad():
        memory, keep_t = model.encoder(**{k: torch.from_numpy(inputs[k]) for k in PATHWAY_INPUTS})
        kv_t = model.decoder.cross_kv(memory)
        np.testing.assert_array_equal(keep, keep_t.numpy())
        flat_t = [t.numpy() for pair in kv_t for t in pair]
        assert max(np.abs(a - e).max() for a, e in zip(kv, flat_t, strict=True)) <= 1e-4
        user_t = model.user(torch.from_numpy(inputs["short_items"])).numpy()
        assert user.shape == (b, CFG.d_model) and np.abs(user - user_t).max() <= 1e-4
        # The cached decoder, each beam following a random parent, against the uncached
        # step on the prefixes those parents spell out.
        search = onnx.search(keep, kv)
        rng = np.random.default_rng(b)
        tokens, parents = np.zeros((b, 6, 0), np.int64), None
        for level in range(CFG.sid_levels):
            ours = search(tokens, parents)
            ref = model.decoder.step(torch.from_numpy(tokens), kv_t, keep_t).numpy()
            assert ours.shape == (b, 6, CFG.codebook_size)
            assert np.abs(ours - ref).max() <= 1e-4
            cache = search.present[0]
            assert cache.shape[2:] == (CFG.n_heads, level + 1, CFG.d_model // CFG.n_heads)
            parents = rng.integers(0, cache.shape[1], (b, 6))
            code = rng.integers(0, CFG.codebook_size, (b, 6, 1))
            rows = np.arange(b)[:, None]
            tokens = np.concatenate([tokens[rows, parents] if level else tokens, code], axis=2)


def test_beam_search_top10_matches_torch(exported) -> None:
    model, onnx, _ = exported
    sids = np.random.default_rng(1).integers(0, CFG.codebook_size, (300, CFG.sid_levels))
    trie = SIDTrie.from_codes(sids, CFG.codebook_size)
    inputs = _pathways(3, 20, 64, 200, seed=9)
    keep, kv, _ = onnx.encode(inputs)
    with torch.no_grad():
        memory, keep_t = model.encoder(**{k: torch.from_numpy(inputs[k]) for k in PATHWAY_INPUTS})
        kv_t = model.decoder.cross_kv(memory)

        def torch_step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
            return model.decoder.step(torch.from_numpy(tokens), kv_t, keep_t).numpy()

        ref = constrained_beam_search(torch_step, 3, 32, trie)
    ours = constrained_beam_search(onnx.search(keep, kv), 3, 32, trie)
    np.testing.assert_array_equal(ours.sids[:, :10], ref.sids[:, :10])
    np.testing.assert_allclose(ours.scores[:, :10], ref.scores[:, :10], atol=1e-4)


def test_parity_report_measures_what_the_tests_assert(exported) -> None:
    """The numbers `onerec export` and `onerec build` print, on two requests."""
    model, onnx, _ = exported
    sids = np.random.default_rng(2).integers(0, CFG.codebook_size, (300, CFG.sid_levels))
    trie = SIDTrie.from_codes(sids, CFG.codebook_size)
    inputs = _pathways(2, 20, 64, 200, seed=4)
    pathways = [{k: v[i] for k, v in inputs.items()} for i in range(2)]
    p = parity(model, onnx, pathways, trie, beam_width=32)
    assert p.requests == 2 and p.top10_equal == 2
    assert 0 <= p.kv_max_abs <= 1e-4 and 0 <= p.step_max_abs <= 1e-4
    assert 0 <= p.cache_max_abs <= 1e-4
    assert 0 <= p.user_max_abs <= 1e-4
    assert "top-10 identical for 2/2" in str(p)


def test_key_padded_attention_is_one_fused_kernel(exported) -> None:
    """The QFormer's, the encoder's and the decoder's cross-attention run as ONNX Runtime's
    fused MultiHeadAttention (the parity tests above hold with it); the decoder's
    self-attention, which has no mask, stays plain."""
    _, _, out = exported

    def ops(name: str) -> Counter:
        return Counter(n.op_type for n in onnx_ir.load(out / f"{name}.onnx").graph.node)

    encoder = ops("encoder")
    assert encoder["MultiHeadAttention"] == CFG.qformer_blocks + CFG.encoder_layers
    for level in range(CFG.sid_levels):
        step = ops(f"decoder_step_{level}")
        assert step["MultiHeadAttention"] == CFG.decoder_layers
        assert step["Softmax"] == CFG.decoder_layers  # the self-attention's
