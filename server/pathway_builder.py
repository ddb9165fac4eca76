"""The four encoder pathways of a request, from the feature store, as the trainer builds them.

:func:`onerec.runtime.pathways.build_pathways` works on a whole history in memory. A server must
not read 100,000 events per request, so this builds the same arrays from three cheap
reads: the last ``short_len`` events, the last ``positive_len`` positive events, and the
lifelong representatives, which are compressed with the trainer's function
(:func:`onerec.runtime.lifelong.compress_history`) and cached per user; they are recomputed once
the user has logged more than 64 events or 1% of the history since (the new events are in
the short-term pathway meanwhile), while the seen-item set is kept exact on every call.
Inline events sent with the request join the short-term and positive
pathways for that request only. A test checks equality with ``build_pathways``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import faiss
import numpy as np

from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import is_positive
from onerec.runtime.lifelong import compress_history
from onerec.runtime.pathways import History, gap_bucket, watch_bucket, weight_bucket
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
    version: int  # the user's event count that ``seen`` covers
    compressed_at: int  # the event count the representatives were computed at
    mark: int  # the store's append position that ``seen`` covers
    items: np.ndarray  # (R,) model item index of each representative, time order
    timestamp: np.ndarray  # (R,)
    weight: np.ndarray  # (R,) cluster-size bucket
    history_len: int
    seen: np.ndarray  # unique model indices of every item in the history
    seen_new: np.ndarray  # ids of history items the model never saw

    @property
    def nbytes(self) -> int:
        arrays = (self.items, self.timestamp, self.weight, self.seen, self.seen_new)
        return sum(a.nbytes for a in arrays) + 200


@dataclass
class Built:
    """One request's pathways, what the user has seen, and where the time went."""

    pathways: dict[str, np.ndarray]
    seen: np.ndarray  # model indices of the history and the inline events
    seen_new: np.ndarray  # ids of seen items the model never saw
    features_s: float  # the short-term and positive reads
    lifelong_s: float  # the lifelong step: a cache lookup, or a fresh compression
    compressed: bool  # False when the compression came from the cache
    history_len: int


class PathwayBuilder:
    """Pathways for a user; thread-safe (called from the server's thread pool)."""

    def __init__(
        self,
        store: FeatureStore,
        cfg: OneRecConfig,
        item_vectors: np.ndarray,
        cache_bytes: int = 256 * 2**20,
        refresh_events: int = 64,
        refresh_fraction: float = 0.01,
    ) -> None:
        self.store, self.cfg, self.vectors = store, cfg, item_vectors
        # Requests compress concurrently on worker threads: faiss's OpenMP team per call
        # oversubscribes the cores (docs/findings.md).
        faiss.omp_set_num_threads(1)
        self.cache_bytes = cache_bytes
        self._bytes = 0
        self.refresh_events, self.refresh_fraction = refresh_events, refresh_fraction
        self._cache: OrderedDict[str, Lifelong] = OrderedDict()
        self._lock = threading.Lock()

    def _fresh_enough(self, hit: Lifelong, version: int) -> bool:
        """A few new events barely move a long history's summary, and they are in the
        short-term pathway anyway: recompress after ``refresh_events`` or
        ``refresh_fraction`` of the history, whichever is more."""
        allowed = max(self.refresh_events, int(self.refresh_fraction * hit.history_len))
        return 0 <= version - hit.compressed_at <= allowed

    def lifelong(self, user_id: str) -> tuple[Lifelong, bool]:
        """The user's compression (cached or new) and whether it was computed now.

        The seen-item sets are always exact: new events since the cached version are
        read (the last few rows) and added, even when the compression is reused.
        """
        version = self.store.version(user_id)
        with self._lock:
            hit = self._cache.get(user_id)
        compressed = False
        if hit is not None and hit.version == version:
            life = hit
        elif hit is not None and self._fresh_enough(hit, version):
            new, mark = self.store.items_after(user_id, hit.mark)
            life = self._with_seen(hit, user_id, version, new, mark)
        else:
            life, compressed = self._compress(user_id, version), True
        with self._lock:  # LRU bounded by bytes: heavy users' entries are much bigger
            old = self._cache.pop(user_id, None)
            self._bytes += life.nbytes - (old.nbytes if old is not None else 0)
            self._cache[user_id] = life
            while self._bytes > self.cache_bytes and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return life, compressed

    def _with_seen(
        self, hit: Lifelong, user_id: str, version: int, new: np.ndarray, mark: int
    ) -> Lifelong:
        n_items = len(self.vectors)
        seen = np.union1d(hit.seen, new[new < n_items])
        seen_new = hit.seen_new
        if (new >= n_items).any():
            seen_new = np.array(self.store.items_outside(user_id, n_items), str)
        return replace(hit, version=version, mark=mark, seen=seen, seen_new=seen_new)

    def _compress(self, user_id: str, version: int) -> Lifelong:
        mark = self.store.mark(user_id)  # first: a later append is read again, never missed
        h = self.store.history(user_id)
        n_items = len(self.vectors)
        known = np.flatnonzero(h.items < n_items)  # the model's items only
        seen = np.unique(h.items[known])
        seen_new = np.array(
            self.store.items_outside(user_id, n_items) if len(known) < len(h) else [], str
        )
        if not len(known):
            empty = np.zeros(0, np.int64)
            return Lifelong(version, version, mark, empty, empty, empty, len(h), seen, seen_new)
        c = compress_history(self.vectors[h.items[known]], budget=self.cfg.lifelong_len)
        keep = known[c.positions]
        return Lifelong(
            version,
            version,
            mark,
            h.items[keep],
            h.timestamp[keep],
            weight_bucket(c.weights),
            len(h),
            seen,
            seen_new,
        )

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
        life, compressed = self.lifelong(user_id)
        lifelong_s = time.perf_counter() - started - features_s
        pathways = {
            "static": np.asarray(static, np.int64),
            **_tokens(short, now_ms, "short"),
            **_tokens(positive, now_ms, "pos"),
            "life_items": life.items.astype(np.int64) + 1,
            "life_gap": gap_bucket(now_ms, life.timestamp),
            "life_weight": life.weight.astype(np.int64),
        }
        seen = np.concatenate([life.seen, inline_seen])
        return Built(
            pathways, seen, life.seen_new, features_s, lifelong_s, compressed, life.history_len
        )
