"""The items the model was trained on, in model-index order: what the front end needs to
turn events into pathway tokens (item ids to model indices, durations for watch ratios,
content vectors for lifelong compression). The build writes them beside the encoder, so
a front end needs the model repository, not the training data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelItems:
    item_ids: np.ndarray  # (n_items,) str; row i is model index i
    duration_ms: np.ndarray  # (n_items,) int64, 0 where unknown
    vectors: np.ndarray  # (n_items, d) float32, the tokenizer's item embeddings

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if len(self.duration_ms) != n or len(self.vectors) != n:
            raise ValueError(
                f"{n} item ids, {len(self.duration_ms)} durations, {len(self.vectors)} vectors"
            )

    def index(self) -> dict[str, int]:
        """Item id -> model index."""
        return {item: i for i, item in enumerate(self.item_ids.tolist())}

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            item_ids=self.item_ids.astype(str),
            duration_ms=self.duration_ms.astype(np.int64),
            vectors=self.vectors.astype(np.float32),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelItems:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["item_ids"], z["duration_ms"], z["vectors"])
