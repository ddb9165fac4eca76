"""The four encoder pathways of a request, from the feature store, as the trainer builds them.

:func:`onerec.pathways.build_pathways` works on a whole history in memory. A server must
not read 100,000 events per request, so this builds the same arrays from three cheap
reads: the last ``short_len`` events, the last ``positive_len`` positive events, and the
lifelong representatives, which are compressed with the trainer's function
(:func:`onerec.lifelong.compress_history`) and cached per user until the user's event
count changes. Inline events sent with the request join the short-term and positive
pathways for that request only. A test checks equality with ``build_pathways``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from onerec.engagement import is_positive
from onerec.lifelong import compress_history
from onerec.model import OneRecConfig
from onerec.pathways import History, gap_bucket, watch_bucket, weight_bucket
from server.feature_store import FeatureStore


def _fields(h: History) -> tuple[np.ndarray, ...]:
    return h.items, h.timestamp, h.watch_ms, h.duration_ms, h.flags


def concat(a: History, b: History) -> History:
    """Both histories' events in time order (stable: stored events first on ties)."""
    h = History(*(np.concatenate(pair) for pair in zip(_fields(a), _fields(b), strict=True)))
    return _take(h, np.argsort(h.timestamp, kind="stable"))


def _take(h: History, rows: np.ndarray | slice) -> History:
    return History(*(f[rows] for f in _fields(h)))


def _tokens(h: History, now_ms: int, prefix: str) -> dict[str, np.ndarray]:
    """Most recent first, as build_pathways orders the short and positive pathways."""
    order = np.arange(len(h) - 1, -1, -1)
    return {
        f"{prefix}_items": h.items[order].astype(np.int64) + 1,
        f"{prefix}_gap": gap_bucket(now_ms, h.timestamp[order]),
        f"{prefix}_watch": watch_bucket(h.watch_ms[order], h.duration_ms[order]),
        f"{prefix}_flags": h.flags[order].astype(np.float32),
    }


@dataclass(frozen=True)
class Lifelong:
    version: int
    items: np.ndarray  # (R,) model item index of each representative, time order
    timestamp: np.ndarray  # (R,)
    weight: np.ndarray  # (R,) cluster-size bucket
    history_len: int


@dataclass
class StageTimes:
    """Seconds spent per stage of one build, for the stage-latency histograms."""

    features: float = 0.0
    lifelong: float = 0.0
    lifelong_cached: bool = True
    history_len: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class PathwayBuilder:
    """Pathways for a user; thread-safe (called from the server's thread pool)."""

    def __init__(
        self,
        store: FeatureStore,
        cfg: OneRecConfig,
        item_vectors: np.ndarray,
        cache_users: int = 10_000,
    ) -> None:
        self.store, self.cfg, self.vectors = store, cfg, item_vectors
        self.cache_users = cache_users
        self._cache: OrderedDict[str, Lifelong] = OrderedDict()
        self._lock = threading.Lock()

    def lifelong(self, user_id: str, times: StageTimes) -> Lifelong:
        """The cached compression, or a new one if the user has new events."""
        version = self.store.version(user_id)
        with self._lock:
            hit = self._cache.get(user_id)
            if hit is not None and hit.version == version:
                self._cache.move_to_end(user_id)
                return hit
        started = time.perf_counter()
        h = self.store.history(user_id)
        known = np.flatnonzero(h.items < len(self.vectors))  # the model's items only
        if len(known):
            c = compress_history(self.vectors[h.items[known]], budget=self.cfg.lifelong_len)
            keep = known[c.positions]
            life = Lifelong(
                version, h.items[keep], h.timestamp[keep], weight_bucket(c.weights), len(h)
            )
        else:
            empty = np.zeros(0, np.int64)
            life = Lifelong(version, empty, empty, empty, len(h))
        times.lifelong, times.lifelong_cached = time.perf_counter() - started, False
        with self._lock:
            self._cache[user_id] = life
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_users:
                self._cache.popitem(last=False)
        return life

    def build(
        self,
        user_id: str,
        now_ms: int,
        static: np.ndarray,
        inline: History | None = None,
    ) -> tuple[dict[str, np.ndarray], StageTimes]:
        """Unbatched pathway arrays, the same as ``build_pathways`` on the full history."""
        times = StageTimes()
        started = time.perf_counter()
        cfg = self.cfg
        short = self.store.recent(user_id, cfg.short_len)
        positive = self.store.recent(user_id, cfg.positive_len, positive_only=True)
        if inline is not None and len(inline):
            short = _take(concat(short, inline), slice(-cfg.short_len, None))
            inline_pos = _take(inline, is_positive(inline.scores()))
            positive = _take(concat(positive, inline_pos), slice(-cfg.positive_len, None))
        features = time.perf_counter() - started
        life = self.lifelong(user_id, times)
        times.features = features
        times.history_len = life.history_len
        return {
            "static": np.asarray(static, np.int64),
            **_tokens(short, now_ms, "short"),
            **_tokens(positive, now_ms, "pos"),
            "life_items": life.items.astype(np.int64) + 1,
            "life_gap": gap_bucket(now_ms, life.timestamp),
            "life_weight": life.weight.astype(np.int64),
        }, times
