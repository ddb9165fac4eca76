"""What the Triton encoder, decoder and reward models do with a dynamic batch, minus Triton.

Triton hands ``execute()`` a list of requests whose sequences have their own lengths
(``allow_ragged_batch``). Each function here stacks them into one padded batch, runs the
model once, and splits the answer back per request, so a model file is only Triton
glue and this logic is tested without a server.

A request's arrays keep Triton's leading batch axis: a client may send several users in
one request, so every request is ``rows`` users and the functions work on rows.
Validation raises :class:`RequestError` naming the tensor; the caller fails that request
alone and serves the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from onerec.runtime.beam_search import constrained_beam_search, exclude_leaves
from onerec.runtime.config import (
    N_FLAGS,
    N_GAP_BUCKETS,
    N_WATCH_BUCKETS,
    N_WEIGHT_BUCKETS,
    OneRecConfig,
)
from onerec.runtime.onnx_runners import REWARD_INPUTS, OnnxDecoder, OnnxEncoder, OnnxReward
from onerec.runtime.pathways import PATHWAY_INPUTS, collate
from onerec.runtime.trie import SIDTrie

MAX_BEAM_WIDTH = 512
# A request may take up to this many times its beam width in SIDs: the best completions of
# the last level's beams (constrained_beam_search's ``final_expand``), at no decoder cost.
MAX_FINAL_EXPAND = 4


class RequestError(ValueError):
    """A request's tensors are unusable; the message names the tensor."""


T = TypeVar("T")


def run_valid(
    requests: Sequence[dict[str, np.ndarray]],
    check: Callable[[dict[str, np.ndarray]], None],
    run: Callable[[list[dict[str, np.ndarray]]], list[T]],
) -> list[T | Exception]:
    """Check every request, run the valid ones as one batch, keep errors per request.

    A bad request gets its :class:`RequestError`; if the batch itself fails, each of its
    requests gets that error, and the model instance lives on to serve the next batch.
    """
    results: list[T | Exception] = [RuntimeError("not run")] * len(requests)
    good = []
    for i, request in enumerate(requests):
        try:
            check(request)
            good.append(i)
        except RequestError as e:
            results[i] = e
    if good:
        try:
            outputs = run([requests[i] for i in good])
        except Exception as e:  # any failure of the batch, reported per request
            outputs = [RuntimeError(f"batch failed: {e}")] * len(good)
        for i, out in zip(good, outputs, strict=True):
            results[i] = out
    return results


def _rows(request: dict[str, np.ndarray], names: Sequence[str]) -> int:
    rows = {request[n].shape[0] for n in names if n in request}
    if len(rows) != 1:
        raise RequestError(f"inputs disagree on the batch size: {sorted(rows)}")
    return rows.pop()


def check_encoder_request(request: dict[str, np.ndarray], cfg: OneRecConfig) -> None:
    """Shapes, lengths and every index against the model's tables (an out-of-range index
    would fail the whole batch inside ONNX Runtime)."""
    _rows(request, PATHWAY_INPUTS)
    for name in PATHWAY_INPUTS:
        a = request[name]
        want = 3 if name.endswith("flags") else 2
        if a.ndim != want or (want == 3 and a.shape[2] != N_FLAGS):
            raise RequestError(f"{name}: expected {want} dimensions, got shape {a.shape}")
    static = request["static"]
    cards = np.asarray(cfg.static_cardinalities, np.int64)
    if static.shape[1] != len(cards):
        raise RequestError(f"static: expected {len(cards)} features, got {static.shape[1]}")
    if ((static < 0) | (static >= cards)).any():
        raise RequestError(f"static: codes must be below {cards.tolist()}")
    limits = {"items": cfg.n_items + 1, "gap": N_GAP_BUCKETS - 1}
    limits |= {"watch": N_WATCH_BUCKETS - 1, "weight": N_WEIGHT_BUCKETS - 1}
    lengths = {"short": cfg.short_len, "pos": cfg.positive_len, "life": cfg.lifelong_len}
    for prefix, max_len in lengths.items():
        names = [n for n in PATHWAY_INPUTS if n.startswith(prefix)]
        seq = {request[n].shape[1] for n in names}
        if len(seq) != 1:
            raise RequestError(f"{prefix}_*: sequence lengths disagree: {sorted(seq)}")
        if seq.pop() > max_len:
            raise RequestError(f"{prefix}_items: longer than {max_len}")
        for name in names:
            a, field = request[name], name.split("_", 1)[1]
            if field == "flags":
                if not np.isfinite(a).all():
                    raise RequestError(f"{name}: must be finite")
            elif ((a < 0) | (a > limits[field])).any():
                raise RequestError(f"{name}: values must be in 0..{limits[field]}")


def length_groups(lengths: np.ndarray, ratio: float = 2.0, floor: int = 64) -> list[np.ndarray]:
    """Indices of ``lengths`` in groups whose longest is at most ``ratio`` times the
    shortest (or ``floor``): a batch padded to its longest member makes every short one
    pay for it, so one heavy user must not multiply a whole batch's encoder work."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or lengths[order[i]] > max(ratio * lengths[order[start]], floor):
            groups.append(order[start:i])
            start = i
    return groups


def encode_batch(
    encoder: OnnxEncoder, requests: Sequence[dict[str, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Valid requests -> per request (keep (rows, T), cross_kv (rows, 2 * layers, h, T, dh),
    user (rows, d)).

    Requests of similar lifelong length run together (:func:`length_groups`), each group
    padded to its longest sequences; ``keep`` marks the padding, which the decoder masks.
    Call :func:`check_encoder_request` first.
    """
    out: list = [None] * len(requests)
    for group in length_groups(np.array([r["life_items"].shape[1] for r in requests])):
        members = [requests[i] for i in group]
        samples = [
            {name: r[name][i] for name in PATHWAY_INPUTS}
            for r in members
            for i in range(r["static"].shape[0])
        ]
        keep, kv, user = encoder.encode(collate(samples))
        cross_kv = np.stack(kv, axis=1)  # (N, 2 * layers, h, T, dh)
        bounds = np.cumsum([r["static"].shape[0] for r in members])[:-1]
        parts = (np.split(a, bounds) for a in (keep, cross_kv, user))
        for i, result in zip(group, zip(*parts, strict=True), strict=True):
            out[i] = result
    return out


@dataclass(frozen=True)
class DecodedRows:
    sids: np.ndarray  # (rows, C, L) best first; C is the request's largest count, and
    # rows past their own count or past the last legal SID are -1
    scores: np.ndarray  # (rows, C) float32, -inf where sids is -1


def check_decoder_request(
    request: dict[str, np.ndarray], trie: SIDTrie, kv_shape: tuple[int, int, int]
) -> None:
    """``kv_shape`` is the decoder's (2 * layers, heads, head_dim), ``OnnxDecoder.kv_shape``:
    a mismatch would otherwise fail inside ONNX Runtime, and with it the whole batch."""
    names = ("keep", "cross_kv", "beam_width", "count", "exclude_sids")
    rows = _rows(request, names)
    keep, kv = request["keep"], request["cross_kv"]
    if keep.ndim != 2:
        raise RequestError(f"keep: expected (batch, T), got {keep.shape}")
    n_kv, heads, dh = kv_shape
    if kv.ndim != 5 or kv.shape[1:3] != (n_kv, heads) or kv.shape[3:] != (keep.shape[1], dh):
        raise RequestError(
            f"cross_kv: expected (batch, {n_kv}, {heads}, T={keep.shape[1]}, {dh}), got {kv.shape}"
        )
    for name in ("beam_width", "count"):
        if request[name].shape != (rows, 1):
            raise RequestError(f"{name}: expected shape ({rows}, 1), got {request[name].shape}")
    width, count = request["beam_width"][:, 0], request["count"][:, 0]
    if ((width < 1) | (width > MAX_BEAM_WIDTH)).any():
        raise RequestError(f"beam_width: must be in 1..{MAX_BEAM_WIDTH}, got {width.tolist()}")
    if ((count < 1) | (count > MAX_FINAL_EXPAND * width)).any():
        raise RequestError(
            f"count: must be in 1..{MAX_FINAL_EXPAND} x beam_width, got {count.tolist()}"
        )
    exclude = request.get("exclude_sids")
    if exclude is not None:
        if exclude.ndim != 3 or exclude.shape[2] != trie.levels:
            raise RequestError(
                f"exclude_sids: expected (batch, E, {trie.levels}), got {exclude.shape}"
            )
        if ((exclude < -1) | (exclude >= trie.codebook_size)).any():
            raise RequestError(f"exclude_sids: codes must be in -1..{trie.codebook_size - 1}")


def _pad_to(a: np.ndarray, length: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, length - a.shape[axis])
    return np.pad(a, pad)


def _stack_cross_kv(
    requests: Sequence[dict[str, np.ndarray]],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """keep (N, T) and each of the 2 * layers cross K/V (N, h, T, dh), zero-padded to the
    longest T, in one copy: K/V is the decoder's largest input, and three copies of it
    (pad, concatenate, one contiguous array per layer) were a visible share of its stub's
    time (docs/benchmarks.md)."""
    longest = max(r["keep"].shape[1] for r in requests)
    rows = sum(r["keep"].shape[0] for r in requests)
    _, n_kv, heads, _, dh = requests[0]["cross_kv"].shape
    keep = np.zeros((rows, longest), bool)
    kv = np.zeros((n_kv, rows, heads, longest, dh), np.float32)
    start = 0
    for r in requests:
        n, t = r["keep"].shape
        keep[start : start + n, :t] = r["keep"]
        kv[:, start : start + n, :, :t] = r["cross_kv"].swapaxes(0, 1)
        start += n
    return keep, list(kv)


def decode_batch(
    decoder: OnnxDecoder, trie: SIDTrie, requests: Sequence[dict[str, np.ndarray]]
) -> list[DecodedRows]:
    """Valid requests -> their ranked SIDs: one beam search, one ONNX call per level.

    Rows are padded to the longest encoder output (masked by ``keep``) and searched at the
    widest beam; each row is cut back to its own width by the search itself. A count above
    a row's width takes the best completions of its last-level beams: the batch's last level
    keeps as many as its largest such ratio asks, and each row is cut to its own count.
    """
    keep, kv_list = _stack_cross_kv(requests)
    widths = np.concatenate([r["beam_width"][:, 0] for r in requests]).astype(np.int64)
    counts = np.concatenate([r["count"][:, 0] for r in requests]).astype(np.int64)
    excluded = [
        row
        for r in requests
        for row in (
            r["exclude_sids"]
            if r.get("exclude_sids") is not None
            else np.zeros((r["keep"].shape[0], 0, trie.levels), np.int64)
        )
    ]
    result = constrained_beam_search(
        decoder.search(keep, kv_list),
        len(keep),
        widths,
        trie,
        exclude=exclude_leaves(trie, excluded),  # -1 padding maps to no leaf and is dropped
        final_expand=int(np.max(-(-counts // widths))),  # ceil: every row gets its count
    )
    out, start = [], 0
    for r in requests:
        stop = start + r["keep"].shape[0]
        c = int(counts[start:stop].max())
        sids, scores = result.sids[start:stop, :c].copy(), result.scores[start:stop, :c].copy()
        beyond = np.arange(c)[None, :] >= counts[start:stop, None]  # a row's own count
        sids[beyond], scores[beyond] = -1, -np.inf
        out.append(DecodedRows(sids, scores))
        start = stop
    return out


@dataclass(frozen=True)
class RewardShape:
    """What a reward request's indices must fit: the model's tables, from reward.json."""

    n_static: int
    static_cardinalities: tuple[int, ...]
    n_items: int  # item tokens are 0 (padding) .. n_items + 1 (an item it never saw)


def check_reward_request(request: dict[str, np.ndarray], shape: RewardShape) -> None:
    """Shapes and every index against the reward model's tables: an index out of range
    would fail the whole batch inside ONNX Runtime."""
    _rows(request, REWARD_INPUTS)
    static = request["static"]
    if static.ndim != 2 or static.shape[1] != shape.n_static:
        raise RequestError(f"static: expected (batch, {shape.n_static}), got {static.shape}")
    if ((static < 0) | (static >= np.array(shape.static_cardinalities))).any():
        raise RequestError(f"static: codes must be below {list(shape.static_cardinalities)}")
    for name in REWARD_INPUTS[1:]:
        a = request[name]
        if a.ndim != 2:
            raise RequestError(f"{name}: expected (batch, length), got {a.shape}")
        if ((a < 0) | (a > shape.n_items + 1)).any():
            raise RequestError(f"{name}: item tokens must be in 0..{shape.n_items + 1}")


def reward_batch(
    reward: OnnxReward, requests: Sequence[dict[str, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Valid requests -> each one's (heads, pscore): one ONNX call, every sequence padded
    to the batch's longest (padding tokens are masked; padded candidates are cut off)."""
    longest = {n: max(r[n].shape[1] for r in requests) for n in REWARD_INPUTS[1:]}
    inputs = [np.concatenate([r["static"] for r in requests])]
    for name in REWARD_INPUTS[1:]:
        inputs.append(np.concatenate([_pad_to(r[name], longest[name], 1) for r in requests]))
    heads, pscore = reward.score(*inputs)
    out, start = [], 0
    for r in requests:
        stop, m = start + r["static"].shape[0], r["candidates"].shape[1]
        out.append((heads[start:stop, :m], pscore[start:stop, :m]))
        start = stop
    return out
