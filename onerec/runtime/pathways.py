"""From a user's event history to the four encoder pathways: shared by trainer and server.

For a user and a request time ``now``:

* **static** -- the user's profile codes;
* **short-term** -- the last ``short_len`` events, most recent first;
* **positive-feedback** -- the last ``positive_len`` events whose engagement score is
  positive (:mod:`onerec.runtime.engagement`), most recent first;
* **lifelong** -- every event, compressed by :func:`onerec.runtime.lifelong.compress_history` to
  at most ``lifelong_len`` representatives (time order), each with its cluster weight.

Each event token carries its item (``item index + 1``; 0 is padding), a time-gap bucket
(log2 seconds before ``now``), a watch-ratio bucket and the six behaviour flags. Batches are
padded to their longest member rather than to the configured maxima, which is what makes
CPU training affordable; the model masks the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec.runtime.config import (
    N_GAP_BUCKETS,
    N_WATCH_BUCKETS,
    N_WEIGHT_BUCKETS,
    OneRecConfig,
    flops_per_request,
)
from onerec.runtime.engagement import engagement_score, is_positive, watch_ratio
from onerec.runtime.lifelong import Compressed, compress_history

FLAG_COLUMNS = ("click", "like", "follow", "comment", "forward", "hate")
# The encoder's inputs, in the order of encoder.onnx and of the ensemble's request.
PATHWAY_INPUTS = (
    "static",
    "short_items",
    "short_gap",
    "short_watch",
    "short_flags",
    "pos_items",
    "pos_gap",
    "pos_watch",
    "pos_flags",
    "life_items",
    "life_gap",
    "life_weight",
)


@dataclass
class History:
    """One user's events in time order, as arrays (what a feature store returns)."""

    items: np.ndarray  # (n,) int item index
    timestamp: np.ndarray  # (n,) int64 ms
    watch_ms: np.ndarray  # (n,) int64
    duration_ms: np.ndarray  # (n,) int64
    flags: np.ndarray  # (n, 6) int8, FLAG_COLUMNS order

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> History:
        """The first ``n`` events: the history as it stood before event ``n``."""
        return History(
            self.items[:n],
            self.timestamp[:n],
            self.watch_ms[:n],
            self.duration_ms[:n],
            self.flags[:n],
        )

    def scores(self) -> np.ndarray:
        cols = {name: self.flags[:, i] for i, name in enumerate(FLAG_COLUMNS)}
        return engagement_score(
            {"watch_ms": self.watch_ms, "duration_ms": self.duration_ms, **cols}
        )


def gap_bucket(now_ms: int, timestamp: np.ndarray) -> np.ndarray:
    seconds = np.maximum(now_ms - timestamp, 0) / 1000.0
    return np.minimum(np.floor(np.log2(1.0 + seconds)).astype(np.int64) + 1, N_GAP_BUCKETS - 1)


def watch_bucket(watch_ms: np.ndarray, duration_ms: np.ndarray) -> np.ndarray:
    tenths = np.floor(watch_ratio(watch_ms, duration_ms) * 10).astype(np.int64)
    return np.minimum(tenths, N_WATCH_BUCKETS - 2) + 1


def weight_bucket(weights: np.ndarray) -> np.ndarray:
    return np.minimum(
        np.floor(np.log2(np.maximum(weights, 1))).astype(np.int64) + 1, N_WEIGHT_BUCKETS - 1
    )


def _event_tokens(h: History, idx: np.ndarray, now_ms: int) -> dict[str, np.ndarray]:
    return {
        "items": h.items[idx].astype(np.int64) + 1,
        "gap": gap_bucket(now_ms, h.timestamp[idx]),
        "watch": watch_bucket(h.watch_ms[idx], h.duration_ms[idx]),
        "flags": h.flags[idx].astype(np.float32),
    }


def build_pathways(
    h: History,
    now_ms: int,
    static: np.ndarray,
    item_vectors: np.ndarray,
    cfg: OneRecConfig,
    compressed: Compressed | None = None,
) -> dict[str, np.ndarray]:
    """Unbatched pathway arrays for one user; ``compressed`` may come from a cache."""
    n = len(h)
    short = np.arange(n - 1, max(n - cfg.short_len, 0) - 1, -1)
    positive = np.flatnonzero(is_positive(h.scores()))[::-1][: cfg.positive_len]
    if compressed is None:
        compressed = compress_history(item_vectors[h.items], budget=cfg.lifelong_len)
    s = _event_tokens(h, short, now_ms)
    p = _event_tokens(h, positive, now_ms)
    life = compressed.positions
    return {
        "static": np.asarray(static, np.int64),
        "short_items": s["items"],
        "short_gap": s["gap"],
        "short_watch": s["watch"],
        "short_flags": s["flags"],
        "pos_items": p["items"],
        "pos_gap": p["gap"],
        "pos_watch": p["watch"],
        "pos_flags": p["flags"],
        "life_items": h.items[life].astype(np.int64) + 1,
        "life_gap": gap_bucket(now_ms, h.timestamp[life]),
        "life_weight": weight_bucket(compressed.weights),
    }


def request_flops(cfg: OneRecConfig, beam_width: int, pathways: dict[str, np.ndarray]) -> int:
    """:func:`onerec.runtime.config.flops_per_request` at this request's own pathway lengths: the
    one definition the server's MFU and the benchmark's both use."""
    return flops_per_request(
        cfg,
        beam_width,
        lifelong_items=len(pathways["life_items"]),
        short_items=len(pathways["short_items"]),
        positive_items=len(pathways["pos_items"]),
    )


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-user pathways, right-padding each sequence with zeros to the batch's longest.

    Every sequence keeps at least one (padding) position so the model's shapes never
    collapse to zero length.
    """
    out: dict[str, np.ndarray] = {}
    for name in samples[0]:
        arrays = [s[name] for s in samples]
        if name == "static":
            out[name] = np.stack(arrays)
            continue
        longest = max(1, max(len(a) for a in arrays))
        batch = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), arrays[0].dtype)
        for i, a in enumerate(arrays):  # one copy per user: request preparation, not the model
            batch[i, : len(a)] = a
        out[name] = batch
    return out
