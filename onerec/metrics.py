"""Offline evaluation: leave-last-out split, full ranking with seen items filtered, Recall/NDCG.

The protocol is fixed by the design brief so that every model (baselines and the generative
model) is judged on the same footing:

* **Split.** For every user with at least ``min_events`` events, the last event (by time; the
  events are sorted by (user, time), so the last row, equal timestamps keeping the loader's
  order) is the target; everything before it is the history. Users with fewer events are
  skipped. :func:`last_out` holds out the last ``n`` events instead, each scored against
  the history up to it: more targets per user, so a smaller standard error.
* **Candidates.** Full ranking over all items, with every item in the user's history set to
  ``-inf``. A target the user has already seen (a repeat) is filtered too, so it always counts
  as a miss: every model pays the same price, and a model gains nothing from favouring repeats.
  Repeats are frequent in the synthetic data (the generator re-draws popular items), so
  ``evaluate_scorer(..., filter_seen=False)`` reports the repeat-inclusive variant beside it.
* **Rank.** The number of other items scoring higher *or equal* (ties broken pessimistically,
  so a constant scorer gets no credit); a non-finite target score is a miss.
* **Metrics.** With one target, Recall@K = HR@K = ``rank < K`` and NDCG@K =
  ``1 / log2(rank + 2)`` when ``rank < K``, else 0; both averaged over users.

Scores are evaluated in chunks of users, so a (users, items) matrix never has to exist whole.
Models that return ranked top-K lists (beam search) use :func:`topk_ranks`. Every path goes
through per-user ranks, so two models on the same split can be compared pairwise
(:func:`gains`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onerec.data.schema import Dataset

KS: tuple[int, ...] = (10, 50)
MISS = np.iinfo(np.int64).max  # the rank of a target that is out of every top K


@dataclass(frozen=True)
class Split:
    """One row per evaluated user; history is ``ds.events[history_start:history_end]``."""

    users: np.ndarray  # (U,) row in ds.users
    history_start: np.ndarray  # (U,) index into ds.events of the user's first event
    history_end: np.ndarray  # (U,) exclusive end of the history == index of the held-out row
    target_items: np.ndarray  # (U,) row in ds.items of the held-out event

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> Split:
        """The split restricted to ``rows`` (e.g. a seeded sample of users)."""
        return Split(
            self.users[rows],
            self.history_start[rows],
            self.history_end[rows],
            self.target_items[rows],
        )


def leave_last_out(ds: Dataset, min_events: int = 3) -> Split:
    """Hold out each user's last event; skip users with fewer than ``min_events`` events."""
    return last_out(ds, 1, min_events)


def last_out(ds: Dataset, n: int, min_events: int = 3) -> Split:
    """Hold out each user's last ``n`` events, one split row each (user-major, oldest
    first), each with the history up to it; skip users whose first held-out event has fewer
    than ``min_events - 1`` events before it.

    One training on the events before all ``n`` scores ``n`` targets per user: ``n`` times
    the held-out events of :func:`leave_last_out`, whose row is each user's last here.
    """
    user = ds.user_index()
    if len(user) == 0:
        empty = np.zeros(0, np.int64)
        return Split(empty, empty, empty, empty)
    starts = np.flatnonzero(np.r_[True, np.diff(user) != 0])  # (G,) first row of each user
    ends = np.r_[starts[1:], len(user)]  # (G,) one past the last row
    keep = ends - starts >= min_events + n - 1
    starts, ends = np.repeat(starts[keep], n), np.repeat(ends[keep], n)
    held = ends - n + np.tile(np.arange(n), int(keep.sum()))  # (G * n,) the held-out rows
    return Split(
        users=user[starts].astype(np.int64),
        history_start=starts.astype(np.int64),
        history_end=held.astype(np.int64),
        target_items=ds.item_index()[held].astype(np.int64),
    )


def history_positions(split: Split, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened histories of ``rows``: (row in ``rows``, event index), both (n_events,)."""
    start, end = split.history_start[rows], split.history_end[rows]
    lengths = end - start
    which = np.repeat(np.arange(len(rows)), lengths)
    offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return which, start[which] + offset


def mask_seen(
    scores: np.ndarray, split: Split, ds: Dataset, rows: np.ndarray | None = None
) -> np.ndarray:
    """Set every item in the history of each row to ``-inf``, in place; returns ``scores``.

    ``scores`` is (len(rows), I), row ``j`` belonging to split row ``rows[j]`` (all rows when
    ``rows`` is None).
    """
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    which, pos = history_positions(split, rows)
    scores[which, ds.item_index()[pos]] = -np.inf
    return scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank: the other items scoring >= the target; ``MISS`` when it is not finite."""
    scores = np.asarray(scores)
    rows = np.arange(len(targets))
    target_score = scores[rows, targets][:, None]  # (U, 1)
    rank = (scores >= target_score).sum(axis=1) - 1  # the target itself is ">="
    return np.where(np.isfinite(target_score[:, 0]), rank, MISS)


def gains(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user value of ``metric`` ("recall@K" or "ndcg@K") from 0-based target ranks: the
    mean is the metric, and paired differences of two models give its standard error."""
    name, k = metric.split("@")
    ranks = np.asarray(ranks)
    hit = ranks < int(k)
    if name == "recall":
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 0) + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K and NDCG@K averaged over users from 0-based target ranks."""
    out: dict[str, float] = {}
    for k in ks:
        for name in ("recall", "ndcg"):
            g = gains(ranks, f"{name}@{k}")
            out[f"{name}@{k}"] = float(g.mean()) if len(g) else 0.0
    return out


def rank_metrics(
    scores: np.ndarray, targets: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Metrics from a full (U, I) score matrix; seen items must already be ``-inf``."""
    return metrics_from_ranks(target_ranks(scores, np.asarray(targets)), ks)


def scorer_ranks(
    score_fn: Callable[[np.ndarray], np.ndarray],
    split: Split,
    ds: Dataset,
    chunk: int = 256,
    filter_seen: bool = True,
) -> np.ndarray:
    """Target ranks (len(split),) from ``score_fn(rows) -> (len(rows), I)``, ``chunk`` rows
    at a time.

    ``rows`` are indices into ``split``; the scores are copied before seen items are masked,
    so ``score_fn`` may return a shared or read-only array (or a CPU tensor).
    ``filter_seen=False`` ranks seen items too: the repeat-inclusive variant of the protocol,
    for data where re-consumption is common (it is not the project's headline number).
    """
    ranks = np.empty(len(split), np.int64)
    for lo in range(0, len(split), chunk):
        rows = np.arange(lo, min(lo + chunk, len(split)))
        scores = np.array(score_fn(rows))  # (b, I) private copy
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        if filter_seen:
            mask_seen(scores, split, ds, rows)
        ranks[rows] = target_ranks(scores, split.target_items[rows])
    return ranks


def evaluate_scorer(
    score_fn: Callable[[np.ndarray], np.ndarray],
    split: Split,
    ds: Dataset,
    chunk: int = 256,
    ks: Sequence[int] = KS,
    filter_seen: bool = True,
) -> dict[str, float]:
    """Recall/NDCG@K of :func:`scorer_ranks`."""
    return metrics_from_ranks(scorer_ranks(score_fn, split, ds, chunk, filter_seen), ks)


def filter_topk_seen(
    topk_items: np.ndarray, split: Split, ds: Dataset, rows: np.ndarray | None = None
) -> np.ndarray:
    """Drop seen items from ranked lists, keeping the order; the freed slots go to the end as -1.

    ``topk_items`` is (len(rows), K) item rows with -1 padding, as beam search returns them.
    """
    topk = np.asarray(topk_items, dtype=np.int64)
    rows = np.arange(len(split)) if rows is None else np.asarray(rows)
    n_items = ds.n_items
    which, pos = history_positions(split, rows)
    seen_keys = which * n_items + ds.item_index()[pos]  # (n_events,) (row, item) pairs
    keys = np.arange(len(rows))[:, None] * n_items + topk  # (b, K)
    drop = (topk < 0) | np.isin(keys, seen_keys)
    order = np.argsort(drop, axis=1, kind="stable")  # kept items first, in their order
    return np.where(np.take_along_axis(drop, order, axis=1), -1, np.take_along_axis(topk, order, 1))


def topk_ranks(topk_items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Target ranks from ranked top-K lists (-1 padded; seen items already removed).

    The target's rank is its first position in the list; a target not in the list is a
    ``MISS``, and so a miss at every K, as is one beyond a list shorter than K.
    """
    topk = np.asarray(topk_items)
    match = topk == np.asarray(targets)[:, None]  # (U, K)
    return np.where(match.any(axis=1), match.argmax(axis=1), MISS)


def rank_metrics_from_topk(
    topk_items: np.ndarray, targets: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall/NDCG@K of :func:`topk_ranks`."""
    return metrics_from_ranks(topk_ranks(topk_items, targets), ks)
