"""The Triton models' batch logic without Triton: ragged stacking, per-request errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onerec.export import export
from onerec.model import OneRec
from onerec.runtime.batching import (
    RequestError,
    check_decoder_request,
    check_encoder_request,
    decode_batch,
    encode_batch,
    length_groups,
    run_valid,
)
from onerec.runtime.config import OneRecConfig
from onerec.runtime.onnx_runners import OnnxDecoder, OnnxEncoder
from onerec.runtime.trie import SIDTrie
from server.triton_client import empty_pathways

CFG = OneRecConfig(
    n_items=50,
    static_cardinalities=(3,),
    codebook_size=8,
    d_model=16,
    n_heads=2,
    d_ff=32,
    d_expert=32,
    positive_len=16,
    lifelong_len=40,
    n_queries=4,
)


@pytest.fixture(scope="module")
def onnx(tmp_path_factory):
    torch.manual_seed(1)
    n = CFG.n_items + 2
    sids = torch.randint(0, CFG.codebook_size, (n, CFG.sid_levels))
    model = OneRec(
        CFG,
        torch.randn(n, CFG.item_vector_dim),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        sids,
    )
    out = tmp_path_factory.mktemp("onnx")
    export(model.eval(), out)
    trie = SIDTrie.from_codes(sids[1:-1].numpy(), CFG.codebook_size)
    return OnnxEncoder(out / "encoder.onnx", 1), OnnxDecoder(out, 1), trie


def _request(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = empty_pathways(CFG)
    for prefix in ("short", "pos", "life"):
        p[f"{prefix}_items"] = rng.integers(1, CFG.n_items + 1, length)
        for field in ("gap", "watch", "weight"):
            if f"{prefix}_{field}" in p:
                p[f"{prefix}_{field}"] = rng.integers(1, 5, length)
        if f"{prefix}_flags" in p:
            p[f"{prefix}_flags"] = rng.integers(0, 2, (length, 6)).astype(np.float32)
    return {k: v[None] for k, v in p.items()}


def test_ragged_requests_decode_as_if_alone(onnx) -> None:
    encoder, decoder, trie = onnx
    requests = [_request(n, seed=n) for n in (3, 11, 7)]
    for r in requests:
        check_encoder_request(r, CFG)
    encoded = encode_batch(encoder, requests)
    widths, counts = (16, 4, 9), (5, 13, 9)  # 13 > 4: the last level's next completions
    decoder_requests = [
        {
            "keep": keep,
            "cross_kv": kv,
            "beam_width": np.array([[w]], np.int32),
            "count": np.array([[c]], np.int32),
        }
        for (keep, kv, _), w, c in zip(encoded, widths, counts, strict=True)
    ]
    together = decode_batch(decoder, trie, decoder_requests)
    for i, r in enumerate(requests):
        keep, kv, user = encode_batch(encoder, [r])[0]
        np.testing.assert_allclose(encoded[i][2], user, atol=1e-5)  # the ranking stage too
        [alone] = decode_batch(
            decoder, trie, [decoder_requests[i] | {"keep": keep, "cross_kv": kv}]
        )
        assert together[i].sids.shape == (1, counts[i], 3)
        np.testing.assert_array_equal(together[i].sids, alone.sids)
        np.testing.assert_allclose(together[i].scores, alone.scores, atol=1e-5)
        assert trie.contains(together[i].sids[0][together[i].sids[0, :, 0] >= 0]).all()
    [beams] = decode_batch(decoder, trie, [decoder_requests[1] | {"count": np.array([[4]])}])
    np.testing.assert_array_equal(together[1].sids[:, :4], beams.sids)  # the beams come first
    assert (together[1].sids[0, 4:, 0] >= 0).any()  # as many as those beams can complete


def test_bad_requests_fail_alone(onnx) -> None:
    encoder, _, _ = onnx
    bad = _request(4, 0) | {"short_items": np.full((1, 4), CFG.n_items + 5)}
    results = run_valid(
        [_request(4, 1), bad, _request(2, 2)],
        lambda a: check_encoder_request(a, CFG),
        lambda batch: encode_batch(encoder, batch),
    )
    assert isinstance(results[1], RequestError) and "short_items" in str(results[1])
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)


def test_a_failing_batch_fails_each_request_but_returns() -> None:
    def explode(batch: list) -> list:
        raise MemoryError("out of memory")

    results = run_valid([{}, {}], lambda a: None, explode)
    assert all("batch failed: out of memory" in str(r) for r in results)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"beam_width": np.array([[0]], np.int32)}, "beam_width"),
        ({"count": np.array([[33]], np.int32)}, "count"),  # beyond 4 x beam_width
        ({"exclude_sids": np.full((1, 2, 3), 8)}, "exclude_sids"),
        ({"keep": np.ones((1, 2), bool)}, "cross_kv"),
        ({"cross_kv": lambda kv: kv[:, :, :1]}, "cross_kv"),  # too few heads
        ({"cross_kv": lambda kv: kv[:, :2]}, "cross_kv"),  # too few layers
        ({"cross_kv": lambda kv: kv[..., :3]}, "cross_kv"),  # narrower heads
    ],
)
def test_decoder_checks_name_the_field(onnx, change, field) -> None:
    encoder, decoder, trie = onnx
    keep, kv, _ = encode_batch(encoder, [_request(3, 0)])[0]
    request = {
        "keep": keep,
        "cross_kv": kv,
        "beam_width": np.array([[8]], np.int32),
        "count": np.array([[8]], np.int32),
    }
    check_decoder_request(request, trie, decoder.kv_shape)  # as encoded: fine
    request |= {k: v(request[k]) if callable(v) else v for k, v in change.items()}
    with pytest.raises(RequestError, match=field):
        check_decoder_request(request, trie, decoder.kv_shape)


def test_length_groups_keep_a_heavy_user_from_padding_everyone() -> None:
    lengths = np.array([2000, 10, 30, 1500, 100, 0, 2000])
    groups = length_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        assert lengths[g].max() <= max(2 * lengths[g].min(), 64)
    assert [sorted(g.tolist()) for g in groups] == [[1, 2, 5], [4], [0, 3, 6]]
