"""The four encoder pathways of a request, from the feature store, as the trainer builds them.

:func:`onerec.runtime.pathways.build_pathways` works on a whole history in memory. A server
must not read 100,000 events per request, nor run k-means on one, so this builds the same
arrays from cheap reads: the last ``short_len`` events, the last ``positive_len`` positive
events, and the user's lifelong record (:class:`onerec.runtime.lifelong.LifelongRecord`:
the compressed pathway and the seen items), which the build stored beside the events and
:class:`LifelongRefresher` keeps fresh in the background. Events appended since a record
was made join its seen items exactly on every call, and the short-term pathway meanwhile.
Inline events sent with the request join the short-term and positive pathways for that
request only. A test checks equality with ``build_pathways``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import faiss
import numpy as np

from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import is_positive
from onerec.runtime.lifelong import LifelongRecord, lifelong_record, recent_distinct
from onerec.runtime.pathways import History, gap_bucket, watch_bucket, weight_bucket
from server.feature_store import FeatureStore, StoreUnavailable

log = logging.getLogger(__name__)


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
    """A user's lifelong pathway and seen items as requests use them: the stored record,
    or a stand-in while there is none, plus the exact seen items of the events appended
    since it was made."""

    record: LifelongRecord
    version: int  # the events it covers, the appended ones included
    mark: int  # the store's append position it covers
    seen: np.ndarray  # distinct model indices, most recent first, at most SEEN_LIMIT
    seen_new: np.ndarray  # ids of seen items the model does not know
    stand_in: bool  # no stored record: the last ``lifelong_len`` events stand in

    @property
    def nbytes(self) -> int:
        r = self.record
        arrays = (r.items, r.timestamp, r.weight, self.seen, self.seen_new)
        return sum(a.nbytes for a in arrays) + 200


@dataclass
class Built:
    """One request's pathways, what the user has seen, and where the time went."""

    pathways: dict[str, np.ndarray]
    seen: np.ndarray  # model indices of the history (most recent first) and inline events
    seen_new: np.ndarray  # ids of seen items the model never saw
    features_s: float  # the short-term and positive reads
    lifelong_s: float  # the lifelong step: a cache lookup, or a read of the stored record
    source: str  # where the lifelong pathway came from: "cache", "store" or "recent"
    history_len: int


def record_of(
    store: FeatureStore,
    user_id: str,
    read: Callable[[], History],
    vectors: np.ndarray,
    budget: int,
) -> LifelongRecord:
    """The lifelong record of the events ``read`` returns (the whole history, or its end
    for a stand-in), marked where the store stood before the read, so an append racing
    it is read again as a delta, never missed."""
    mark = store.mark(user_id)
    h = read()
    n_items = len(vectors)
    outside = (h.items >= n_items).any()
    seen_new = np.array(store.items_outside(user_id, n_items) if outside else [], str)
    return lifelong_record(h.items, h.timestamp, vectors, budget, mark, seen_new)


class PathwayBuilder:
    """Pathways for a user; thread-safe (called from the server's thread pool).

    The lifelong pathway never runs k-means here: it is the user's stored record
    (compressed at the build and by :class:`LifelongRefresher`), kept in an LRU cache by
    bytes, with the items appended since it read as a delta. A record older than
    ``refresh_events`` events or ``refresh_fraction`` of the history (whichever is more)
    is still used, and a background refresh is asked for.
    """

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
        self.cache_bytes = cache_bytes
        self._bytes = 0
        self.refresh_events, self.refresh_fraction = refresh_events, refresh_fraction
        self._cache: OrderedDict[str, Lifelong] = OrderedDict()
        self._lock = threading.Lock()
        self.refresher = LifelongRefresher(store, item_vectors, cfg.lifelong_len, self._stale)
        self.refresher.refreshed.append(self.forget)

    def _stale(self, covered: int, version: int) -> bool:
        """Whether a record covering ``covered`` of ``version`` events needs recompressing.
        A few new events barely move a long history's summary, and they are in the
        short-term pathway anyway: refresh after ``refresh_events`` or ``refresh_fraction``
        of the history, whichever is more."""
        allowed = max(self.refresh_events, int(self.refresh_fraction * covered))
        return version - covered > allowed

    def lifelong(self, user_id: str, version: int) -> tuple[Lifelong, str]:
        """The user's lifelong pathway at ``version`` (the store's, read by the caller) and
        its source: "cache", "store" (the stored record) or "recent" (no record yet: the
        last events stand in)."""
        with self._lock:
            hit = self._cache.get(user_id)
        if hit is not None and hit.version <= version:
            life, source = self._advance(hit, user_id, version), "cache"
        elif (record := self.store.lifelong(user_id)) is not None:
            life, source = self._advance(self._of(record), user_id, version), "store"
        else:
            life, source = self._stand_in(user_id, version), "recent"
        stale = self._stale(life.record.version, version)
        if (life.stand_in and version > self.cfg.lifelong_len) or stale:
            self.refresher.request(user_id)
        with self._lock:  # LRU bounded by bytes: heavy users' entries are much bigger
            old = self._cache.pop(user_id, None)
            self._bytes += life.nbytes - (old.nbytes if old is not None else 0)
            self._cache[user_id] = life
            while self._bytes > self.cache_bytes and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return life, source

    def forget(self, user_id: str) -> None:
        """Drop the cached entry: the store holds a newer record (after a refresh)."""
        with self._lock:
            old = self._cache.pop(user_id, None)
            if old is not None:
                self._bytes -= old.nbytes

    @staticmethod
    def _of(record: LifelongRecord) -> Lifelong:
        """The record's seen items move to the entry (which keeps them current), so the
        cache holds and counts them once."""
        none = np.zeros(0, np.int64)
        kept = replace(record, seen=none, seen_new=none.astype(str))
        return Lifelong(kept, record.version, record.mark, record.seen, record.seen_new, False)

    def _advance(self, life: Lifelong, user_id: str, version: int) -> Lifelong:
        """``life`` plus the items appended after its mark: seen stays exact."""
        if version == life.version:
            return life
        new, mark = self.store.items_after(user_id, life.mark)
        n_items = len(self.vectors)
        seen = recent_distinct(np.concatenate([life.seen[::-1], new[new < n_items]]))
        seen_new = life.seen_new
        if (new >= n_items).any():
            seen_new = np.array(self.store.items_outside(user_id, n_items), str)
        return replace(life, version=version, mark=mark, seen=seen, seen_new=seen_new)

    def _stand_in(self, user_id: str, version: int) -> Lifelong:
        """No stored record (a user who arrived by LogEvents): the last ``lifelong_len``
        events, each standing for itself. For a history no longer than that, this is
        exactly what compression would give; a longer one gets a refresh."""
        budget = self.cfg.lifelong_len
        read = partial(self.store.recent, user_id, budget)
        life = self._of(record_of(self.store, user_id, read, self.vectors, budget))
        return replace(life, version=version, stand_in=True)

    def build(
        self,
        user_id: str,
        now_ms: int,
        static: np.ndarray,
        inline: History | None = None,
        *,
        version: int | None = None,
    ) -> Built:
        """The same arrays as ``build_pathways`` on the stored history plus ``inline``.
        ``version`` is the store's, where the caller has just read it (one read less)."""
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
        if version is None:
            version = self.store.version(user_id)
        life, source = self.lifelong(user_id, version)
        lifelong_s = time.perf_counter() - started - features_s
        r = life.record
        pathways = {
            "static": np.asarray(static, np.int64),
            **_tokens(short, now_ms, "short"),
            **_tokens(positive, now_ms, "pos"),
            "life_items": r.items.astype(np.int64) + 1,
            "life_gap": gap_bucket(now_ms, r.timestamp),
            "life_weight": weight_bucket(r.weight),
        }
        seen = np.concatenate([inline_seen, life.seen])
        return Built(pathways, seen, life.seen_new, features_s, lifelong_s, source, life.version)


class LifelongRefresher:
    """Recompresses users' lifelong records in one background thread and stores them, so
    requests never wait for k-means. A user is queued once however often it is asked for;
    beyond ``max_pending`` users, requests are dropped (the next one asks again)."""

    def __init__(
        self,
        store: FeatureStore,
        vectors: np.ndarray,
        budget: int,
        stale: Callable[[int, int], bool],
        max_pending: int = 10_000,
    ) -> None:
        self.store, self.vectors, self.budget, self.stale = store, vectors, budget, stale
        self.max_pending = max_pending
        self.refreshed: list[Callable[[str], None]] = []  # called with each user looked at
        self._pending: set[str] = set()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifelong-refresh", daemon=True)
        self._thread.start()

    def request(self, user_id: str) -> None:
        with self._lock:
            if user_id in self._pending or len(self._pending) >= self.max_pending:
                return
            self._pending.add(user_id)
        self._queue.put(user_id)

    def _run(self) -> None:
        # One core for faiss, the request path shares the machine. OpenMP keeps the
        # setting per calling thread, so it is set here, on the thread that clusters.
        faiss.omp_set_num_threads(1)
        while (user_id := self._queue.get()) is not None:
            try:
                if not self._closing.is_set():  # closing: what is queued is dropped
                    self.refresh(user_id)
            except StoreUnavailable as e:
                log.warning("lifelong refresh of %s skipped: %s", user_id, e)
            except Exception:  # the thread must outlive any one user
                log.exception("lifelong refresh of %s failed", user_id)
            finally:
                with self._lock:
                    self._pending.discard(user_id)
                self._queue.task_done()
        self._queue.task_done()

    def refresh(self, user_id: str) -> bool:
        """Recompress ``user_id`` if its record is missing or stale; True if it did.
        Either way the ``refreshed`` callbacks run: another front end may have stored a
        fresh record since this one asked, and a cache holding the old one must drop it."""
        version = self.store.version(user_id)
        covered = self.store.lifelong_version(user_id)
        recompress = covered is None or self.stale(covered, version)
        if recompress:
            read = partial(self.store.history, user_id)
            fresh = record_of(self.store, user_id, read, self.vectors, self.budget)
            self.store.put_lifelong(user_id, fresh)
        for callback in self.refreshed:
            callback(user_id)
        return recompress

    def drain(self) -> None:
        """Wait until every queued refresh is done."""
        self._queue.join()

    def close(self) -> None:
        """Stop after the refresh in progress; what is still queued is dropped (the
        next request for those users asks again)."""
        self._closing.set()
        self._queue.put(None)
        self._thread.join(30)
