"""The feature store's initial contents from a build's data set: every profile and event,
with the engagement rule's positive flag, and each user's compressed lifelong pathway, so
that no request runs k-means; handed to the store's bulk load."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from onerec.data.schema import Dataset
from onerec.event_arrays import EventArrays
from onerec.runtime.engagement import engagement_score, is_positive
from onerec.runtime.lifelong import LifelongRecord, lifelong_record
from onerec.runtime.pathways import FLAG_COLUMNS
from server.feature_store import FLAG_BITS, BulkRows, bulk_load


def dataset_rows(
    ds: Dataset, vectors: np.ndarray, budget: int, progress: Callable[[Iterable], Iterable] = iter
) -> BulkRows:
    """``vectors`` are the model's item vectors and ``budget`` its lifelong length: what
    the front end compresses with."""
    ev = ds.events
    events = EventArrays.from_dataset(ds)
    item_idx = events.items.astype(np.int64)
    records: list[LifelongRecord | None] = []
    empty = np.zeros(0, str)
    for u in progress(range(ds.n_users)):
        h = events.user(u)
        records.append(
            lifelong_record(h.items.astype(np.int64), h.timestamp, vectors, budget, -1, empty)
            if len(h)
            else None
        )
    return BulkRows(
        static=ds.users[ds.static_feature_columns()].to_numpy(np.int64),
        user_ids=ds.users["user_id"].astype(str).tolist(),
        event_user=ev["user_id"].astype(str).to_numpy(),
        item_id=ev["item_id"].astype(str).to_numpy(),
        item_idx=item_idx,
        ts=events.timestamp,
        watch_ms=ev["watch_ms"].to_numpy(np.int64),
        duration_ms=ev["duration_ms"].to_numpy(np.int64),
        flags=ev[list(FLAG_COLUMNS)].to_numpy(np.int64) @ FLAG_BITS,
        positive=is_positive(engagement_score(ev)),
        lifelong=records,
    )


def load_store(
    ds: Dataset, spec: str | Path, vectors: np.ndarray, budget: int, progress: bool = False
) -> None:
    """Replace the store ``spec`` names (a SQLite path or a redis:// URL) with ``ds``'s users
    and events and their lifelong records, with progress bars when asked."""
    from rich.progress import track

    def bar(what: str) -> Callable[[Iterable], Iterable]:
        return (lambda it: track(it, what)) if progress else iter

    rows = dataset_rows(ds, vectors, budget, bar("compressing lifelong histories"))
    bulk_load(spec, rows, bar("loading the feature store") if progress else None)
