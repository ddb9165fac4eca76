"""The one event-log format that every loader produces and every consumer reads.

A data set is a directory with these files:

``events.parquet`` -- one row per interaction, sorted by (user_id, timestamp):

==============  =========  ================================================================
column          dtype      meaning
==============  =========  ================================================================
user_id         category   categories == ``users.user_id`` in order, so ``.cat.codes`` is
                           the user's row in ``users``
item_id         category   categories == ``items.item_id`` in order (row in ``items``)
timestamp       int64      milliseconds since the Unix epoch
watch_ms        int64      how long the item was played (0 when the source has no playback)
duration_ms     int64      the item's length when shown (0 when unknown)
click .. hate   int8       behaviour flags, 0 or 1: click, like, follow, comment, forward, hate
==============  =========  ================================================================

Sources may add columns (``rating`` for MovieLens, ``long_view`` for KuaiRand, ...);
consumers must ignore columns they do not know.

``users.parquet`` -- one row per user: ``user_id`` (str) plus static profile features.
Every other column is a categorical feature coded as int64 in ``[0, cardinality)``.

``items.parquet`` -- one row per item: ``item_id``, ``author_id``, ``category``, ``tag``
and ``title`` (str; "" when unknown) and ``duration_ms`` (int64, 0 when unknown).

``item_content.npy`` -- float32 ``(n_items, d)``: the item's content vector, row-aligned
with ``items``.

``ground_truth.npz`` -- optional, synthetic data only: what the oracle needs to compute the
true next-item distribution, and the user simulator the users' reactions to any item (see
:mod:`onerec.data.synthetic` and :mod:`onerec.simulator`).

``meta.json`` -- name, source and free-form details of how the set was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FLAGS: tuple[str, ...] = ("click", "like", "follow", "comment", "forward", "hate")
EVENT_COLUMNS: tuple[str, ...] = (
    "user_id",
    "item_id",
    "timestamp",
    "watch_ms",
    "duration_ms",
    *FLAGS,
)
ITEM_COLUMNS: tuple[str, ...] = ("item_id", "author_id", "category", "tag", "title", "duration_ms")


class DataError(ValueError):
    """A source file is missing or malformed; the message names the file (and line)."""


@dataclass
class Dataset:
    """Events, users, items and item content vectors in the canonical schema."""

    name: str
    events: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    item_content: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    ground_truth: dict[str, np.ndarray] | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user_index(self) -> np.ndarray:
        """Row in ``users`` of every event (int32)."""
        return self.events["user_id"].cat.codes.to_numpy(np.int32)

    def item_index(self) -> np.ndarray:
        """Row in ``items`` of every event (int32)."""
        return self.events["item_id"].cat.codes.to_numpy(np.int32)

    def static_feature_columns(self) -> list[str]:
        return [c for c in self.users.columns if c != "user_id"]

    def validate(self) -> None:
        """Raise :class:`DataError` unless every schema invariant holds."""
        validate(self)

    def save(self, path: str | Path) -> Path:
        """Write the data set as a directory; returns the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.validate()
        self.events.to_parquet(out / "events.parquet", index=False)
        self.users.to_parquet(out / "users.parquet", index=False)
        self.items.to_parquet(out / "items.parquet", index=False)
        np.save(out / "item_content.npy", self.item_content.astype(np.float32))
        if self.ground_truth is not None:
            np.savez(out / "ground_truth.npz", **self.ground_truth)
        meta = {"name": self.name, **self.meta}
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read a directory written by :meth:`save`."""
        src = Path(path)
        for name in ("events.parquet", "users.parquet", "items.parquet", "item_content.npy"):
            if not (src / name).is_file():
                raise DataError(f"{src / name}: missing data set file")
        meta_path = src / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        gt_path = src / "ground_truth.npz"
        ground_truth = None
        if gt_path.is_file():
            with np.load(gt_path) as gt:
                ground_truth = {k: gt[k] for k in gt.files}
        ds = cls(
            name=meta.pop("name", src.name),
            events=pd.read_parquet(src / "events.parquet"),
            users=pd.read_parquet(src / "users.parquet"),
            items=pd.read_parquet(src / "items.parquet"),
            item_content=np.load(src / "item_content.npy"),
            meta=meta,
            ground_truth=ground_truth,
        )
        ds.validate()
        return ds

    def summary(self) -> dict[str, Any]:
        """Sizes and history-length quantiles, for people and reports."""
        lengths = np.bincount(self.user_index(), minlength=self.n_users)
        active = lengths[lengths > 0]
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "events": len(self.events),
            "content_dim": int(self.item_content.shape[1]),
            "history_min": int(active.min()) if active.size else 0,
            "history_median": float(np.median(active)) if active.size else 0.0,
            "history_max": int(active.max()) if active.size else 0,
        }


def make_events(frame: pd.DataFrame, user_ids: pd.Index, item_ids: pd.Index) -> pd.DataFrame:
    """Cast a raw event frame to the canonical dtypes, sorted by (user, time).

    ``user_ids``/``item_ids`` become the categories, so codes index ``users``/``items``.
    Ids absent from them raise :class:`DataError` rather than silently becoming NaN.
    """
    out = frame.copy()
    for col, ids in (("user_id", user_ids), ("item_id", item_ids)):
        values = out[col].astype(str)
        cat = pd.Categorical(values, categories=pd.Index(ids.astype(str)).rename(None))
        unknown = values[cat.codes < 0]
        if len(unknown):
            raise DataError(
                f"events: {len(unknown)} rows reference unknown {col} {unknown.iloc[0]!r}"
            )
        out[col] = cat
    for col in ("timestamp", "watch_ms", "duration_ms"):
        out[col] = out[col].astype(np.int64)
    for col in FLAGS:
        out[col] = out[col].astype(np.int8)
    extra = [c for c in out.columns if c not in EVENT_COLUMNS]
    out = out[[*EVENT_COLUMNS, *extra]]
    order = np.lexsort((out["timestamp"].to_numpy(), out["user_id"].cat.codes.to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def validate(ds: Dataset) -> None:
    """Check the invariants documented in this module's docstring."""
    ev, users, items = ds.events, ds.users, ds.items
    missing = [c for c in EVENT_COLUMNS if c not in ev.columns]
    if missing:
        raise DataError(f"{ds.name}: events lack columns {missing}")
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise DataError(f"{ds.name}: items lack columns {missing}")
    if "user_id" not in users.columns:
        raise DataError(f"{ds.name}: users lack column 'user_id'")
    for col, table in (("user_id", users), ("item_id", items)):
        if not isinstance(ev[col].dtype, pd.CategoricalDtype):
            raise DataError(f"{ds.name}: events.{col} must be categorical")
        if not ev[col].cat.categories.equals(pd.Index(table[col].astype(str))):
            raise DataError(f"{ds.name}: events.{col} categories differ from the {col} table")
        if table[col].duplicated().any():
            raise DataError(f"{ds.name}: duplicate {col} in its table")
        if (ev[col].cat.codes < 0).any():
            raise DataError(f"{ds.name}: events.{col} has missing values")
    for col in FLAGS:
        if not ev[col].isin((0, 1)).all():
            raise DataError(f"{ds.name}: events.{col} must be 0 or 1")
    if (ev["watch_ms"] < 0).any() or (ev["duration_ms"] < 0).any():
        raise DataError(f"{ds.name}: events have negative watch_ms or duration_ms")
    for col in ds.static_feature_columns():
        if not pd.api.types.is_integer_dtype(users[col]) or (users[col] < 0).any():
            raise DataError(f"{ds.name}: users.{col} must be a non-negative integer code")
    if ds.item_content.ndim != 2 or ds.item_content.shape[0] != len(items):
        raise DataError(
            f"{ds.name}: item_content shape {ds.item_content.shape} does not match "
            f"{len(items)} items"
        )
    if not np.isfinite(ds.item_content).all():
        raise DataError(f"{ds.name}: item_content has non-finite values")
    codes = ev["user_id"].cat.codes.to_numpy()
    ts = ev["timestamp"].to_numpy()
    unsorted = (np.diff(codes) < 0) | ((np.diff(codes) == 0) & (np.diff(ts) < 0))
    if unsorted.any():
        raise DataError(f"{ds.name}: events are not sorted by (user_id, timestamp)")
