"""One engagement score from multi-behaviour feedback, in the spirit of OneRec's P-Score.

OneRec learns a preference score from many behaviour heads. Here the score is a fixed,
readable linear formula over the event schema, so every component (trainer, feature store,
front end) ranks "positive feedback" the same way:

    watch = clip(watch_ms / duration_ms, 0, WATCH_CAP) / WATCH_CAP    (0 when duration unknown)
    score = 1.0 * watch + 1.0 * like + 2.0 * follow + 1.5 * comment + 2.0 * forward
            - 4.0 * hate

* The watch term saturates at ``WATCH_CAP`` (1.5 plays), so looping a clip cannot
  outweigh an explicit signal.
* Rarer, costlier actions weigh more (follow and forward share the item with others).
* ``hate`` is a strong negative: one "not interested" cancels a like, a follow and a
  full watch.

An event is *positive* when ``score >= POSITIVE_THRESHOLD`` (0.75): a like alone, a full
watch plus any explicit action, or about 1.1 plays alone. On MovieLens, where there is no
playback, this reduces to "rating >= 4" because the loader maps that to ``like``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WATCH_CAP = 1.5
WEIGHTS: Mapping[str, float] = {
    "like": 1.0,
    "follow": 2.0,
    "comment": 1.5,
    "forward": 2.0,
    "hate": -4.0,
}
WATCH_WEIGHT = 1.0
POSITIVE_THRESHOLD = 0.75
# The reward model's heads (onerec.reward): the formula's watch term, then the flags; and
# the weight of each in the P-Score, which is this formula applied to the heads' values.
HEADS = ("watch", "click", "like", "follow", "comment", "forward", "hate")
HEAD_WEIGHTS = np.array([WATCH_WEIGHT, *(WEIGHTS.get(h, 0.0) for h in HEADS[1:])], np.float32)


def watch_ratio(watch_ms: np.ndarray, duration_ms: np.ndarray) -> np.ndarray:
    """Fraction of the item played, 0 where the duration is unknown (<= 0)."""
    watch = np.asarray(watch_ms, dtype=np.float64)
    duration = np.asarray(duration_ms, dtype=np.float64)
    out = np.zeros(np.broadcast(watch, duration).shape)
    np.divide(watch, duration, out=out, where=duration > 0)
    return out


def engagement_score(events: Mapping[str, np.ndarray]) -> np.ndarray:
    """Score of each event; ``events`` maps schema column names to equal-length arrays."""
    ratio = watch_ratio(events["watch_ms"], events["duration_ms"])
    score = WATCH_WEIGHT * np.clip(ratio, 0.0, WATCH_CAP) / WATCH_CAP
    for flag, weight in WEIGHTS.items():
        score = score + weight * np.asarray(events[flag], dtype=np.float64)
    return score.astype(np.float32)


def is_positive(score: np.ndarray) -> np.ndarray:
    """The events that feed the positive-feedback pathway."""
    return np.asarray(score) >= POSITIVE_THRESHOLD
