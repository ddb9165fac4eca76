"""The feature store's initial contents from a build's data set: every profile and event,
with the engagement rule's positive flag, handed to the store's bulk load."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec.data.schema import Dataset
from onerec.runtime.engagement import engagement_score, is_positive
from onerec.runtime.pathways import FLAG_COLUMNS
from server.feature_store import FLAG_BITS, BulkRows, bulk_load


def dataset_rows(ds: Dataset) -> BulkRows:
    ev = ds.events
    return BulkRows(
        static=ds.users[ds.static_feature_columns()].to_numpy(np.int64),
        user_ids=ds.users["user_id"].astype(str).tolist(),
        event_user=ev["user_id"].astype(str).to_numpy(),
        item_id=ev["item_id"].astype(str).to_numpy(),
        item_idx=ds.item_index().astype(np.int64),
        ts=ev["timestamp"].to_numpy(np.int64),
        watch_ms=ev["watch_ms"].to_numpy(np.int64),
        duration_ms=ev["duration_ms"].to_numpy(np.int64),
        flags=ev[list(FLAG_COLUMNS)].to_numpy(np.int64) @ FLAG_BITS,
        positive=is_positive(engagement_score(ev)),
    )


def load_store(ds: Dataset, spec: str | Path, progress: bool = False) -> None:
    """Replace the store ``spec`` names (a SQLite path or a redis:// URL) with ``ds``'s users
    and events, with a progress bar when asked."""
    from rich.progress import track

    bar = (lambda users: track(users, "loading the feature store")) if progress else None
    bulk_load(spec, dataset_rows(ds), bar)
