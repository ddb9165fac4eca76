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
from dataclasses import dataclass

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
    seen: np.ndarray  # unique model indices of every item in the history
    seen_new: np.ndarray  # ids of history items the model never saw


@dataclass
class Built:
    """One request's pathways, what the user has seen, and where the time went."""

    pathways: dict[str, np.ndarray]
    seen: np.ndarray  # model indices of the history and the inline events
    seen_new: np.ndarray  # ids of seen items the model never saw
    features_s: float
    lifelong_s: float  # 0 when the compression came from the cache
    history_len: int


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

    def lifelong(self, user_id: str) -> tuple[Lifelong, float]:
        """The cached compression, or a new one if the user has new events."""
        version = self.store.version(user_id)
        with self._lock:
            hit = self._cache.get(user_id)
            if hit is not None and hit.version == version:
                self._cache.move_to_end(user_id)
                return hit, 0.0
        started = time.perf_counter()
        h = self.store.history(user_id)
        n_items = len(self.vectors)
        known = np.flatnonzero(h.items < n_items)  # the model's items only
        seen = np.unique(h.items[known])
        seen_new = np.array(
            self.store.items_outside(user_id, n_items) if len(known) < len(h) else [], str
        )
        if len(known):
            c = compress_history(self.vectors[h.items[known]], budget=self.cfg.lifelong_len)
            keep = known[c.positions]
            life = Lifelong(
                version,
                h.items[keep],
                h.timestamp[keep],
                weight_bucket(c.weights),
                len(h),
                seen,
                seen_new,
            )
        else:
            empty = np.zeros(0, np.int64)
            life = Lifelong(version, empty, empty, empty, len(h), seen, seen_new)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._cache[user_id] = life
            self._cache.move_to_end(user_id)
            while len(self._cache) > self.cache_users:
                self._cache.popitem(last=False)
        return life, elapsed

    def build(
        self,
        user_id: str,
        now_ms: int,
        static: np.ndarray,
        inline: History | None = None,
    ) -> Built:
        """The same arrays as ``build_pathways`` on the stored history plus ``inline``."""
        started = time.perf_counter()
        cfg = self.cfg
        short = self.store.recent(user_id, cfg.short_len)
        positive = self.store.recent(user_id, cfg.positive_len, positive_only=True)
        inline_seen = np.zeros(0, np.int64)
        if inline is not None and len(inline):
            short = _take(concat(short, inline), slice(-cfg.short_len, None))
            inline_pos = _take(inline, is_positive(inline.scores()))
            positive = _take(concat(positive, inline_pos), slice(-cfg.positive_len, None))
            inline_seen = inline.items
        features_s = time.perf_counter() - started
        life, lifelong_s = self.lifelong(user_id)
        pathways = {
            "static": np.asarray(static, np.int64),
            **_tokens(short, now_ms, "short"),
            **_tokens(positive, now_ms, "pos"),
            "life_items": life.items.astype(np.int64) + 1,
            "life_gap": gap_bucket(now_ms, life.timestamp),
            "life_weight": life.weight.astype(np.int64),
        }
        seen = np.concatenate([life.seen, inline_seen])
        return Built(pathways, seen, life.seen_new, features_s, lifelong_s, life.history_len)
