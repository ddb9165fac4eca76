"""A data set's events as flat arrays, for training and evaluation: cheap per-user
:class:`~onerec.runtime.pathways.History` slices, and left-padded item windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onerec.data.schema import Dataset
from onerec.runtime.pathways import FLAG_COLUMNS, History


@dataclass
class EventArrays:
    """A data set's events as flat arrays with per-user offsets, for cheap ``History`` slices."""

    items: np.ndarray
    timestamp: np.ndarray
    watch_ms: np.ndarray
    duration_ms: np.ndarray
    flags: np.ndarray
    offsets: np.ndarray  # (U + 1,): user u's events are rows offsets[u]:offsets[u + 1]

    @classmethod
    def from_dataset(cls, ds: Dataset) -> EventArrays:
        ev = ds.events
        users = ds.user_index()
        return cls(
            items=ds.item_index(),
            timestamp=ev["timestamp"].to_numpy(np.int64),
            watch_ms=ev["watch_ms"].to_numpy(np.int64),
            duration_ms=ev["duration_ms"].to_numpy(np.int64),
            flags=ev[list(FLAG_COLUMNS)].to_numpy(np.int8),
            offsets=np.searchsorted(users, np.arange(ds.n_users + 1)),
        )

    def user(self, u: int) -> History:
        lo, hi = self.offsets[u], self.offsets[u + 1]
        return History(
            self.items[lo:hi],
            self.timestamp[lo:hi],
            self.watch_ms[lo:hi],
            self.duration_ms[lo:hi],
            self.flags[lo:hi],
        )


def windows(items: np.ndarray, start: np.ndarray, end: np.ndarray, length: int) -> np.ndarray:
    """Tokens of ``items[max(start, end - length):end]`` for each row, left-padded: (B, length)."""
    pos = end[:, None] - length + np.arange(length)  # (B, length) event indices
    valid = pos >= start[:, None]
    return np.where(valid, items[np.clip(pos, 0, None)] + 1, 0).astype(np.int64)
