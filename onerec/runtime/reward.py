"""What serving needs to know of the reward model (:mod:`onerec.reward`), without torch:
its tables' sizes (to validate requests), the fitted blend of the final ranking stage
(:func:`onerec.runtime.ranking.rank_by_reward`), and its FLOPs, which count toward MFU.
The build writes it as ``reward.json`` beside ``reward.onnx``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from onerec.runtime.engagement import HEADS


@dataclass(frozen=True)
class RewardMeta:
    d: int
    hidden: int
    pos_len: int  # the newest positive items the tower reads (a request may carry more)
    n_items: int
    static_cardinalities: tuple[int, ...]
    blend: float  # the SID log-probability's weight beside the P-Score

    def flops(self, candidates: int, short_items: int) -> int:
        """Matmul FLOPs of scoring ``candidates`` items for one user whose short-term
        pathway holds ``short_items``: the user tower once, then per candidate the target
        attention over the short-term items and the head MLP (the item table is
        precomputed; the fusion's few multiply-adds are element-wise work). Checked
        against torch's FlopCounterMode by a test."""
        d, h, m, s = self.d, self.hidden, candidates, short_items
        user = 2 * 3 * d * d
        attention = 2 * 2 * m * s * d
        head = 2 * m * (5 * d * h + h * h + h * len(HEADS))
        return user + attention + head

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> RewardMeta:
        meta = json.loads(Path(path).read_text())
        meta["static_cardinalities"] = tuple(meta["static_cardinalities"])
        return cls(**meta)
