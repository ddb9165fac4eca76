"""The engagement score: the documented formula and the positive-feedback threshold."""

from __future__ import annotations

import numpy as np

from onerec.runtime.engagement import engagement_score, is_positive, watch_ratio


def _events(**cols: list[float]) -> dict[str, np.ndarray]:
    n = len(next(iter(cols.values())))
    base = {k: np.zeros(n) for k in ("watch_ms", "like", "follow", "comment", "forward", "hate")}
    base["duration_ms"] = np.full(n, 10_000.0)
    base.update({k: np.asarray(v, float) for k, v in cols.items()})
    return base


def test_watch_ratio_is_zero_when_duration_unknown() -> None:
    np.testing.assert_array_equal(watch_ratio(np.array([5, 5]), np.array([0, 10])), [0.0, 0.5])


def test_formula_values() -> None:
    ev = _events(
        watch_ms=[0, 15_000, 30_000, 10_000, 0],
        like=[1, 0, 0, 1, 0],
        hate=[0, 0, 0, 1, 0],
        forward=[0, 0, 0, 0, 1],
    )
    np.testing.assert_allclose(
        engagement_score(ev), [1.0, 1.0, 1.0, 1.0 + 2 / 3 - 4.0, 2.0], rtol=1e-6
    )


def test_each_positive_action_raises_the_score_and_hate_lowers_it() -> None:
    base = engagement_score(_events(watch_ms=[5_000]))[0]
    for flag in ("like", "follow", "comment", "forward"):
        assert engagement_score(_events(watch_ms=[5_000], **{flag: [1]}))[0] > base
    assert engagement_score(_events(watch_ms=[5_000], hate=[1]))[0] < base


def test_positive_threshold() -> None:
    ev = _events(watch_ms=[0, 10_000, 20_000], like=[1, 0, 0])
    assert is_positive(engagement_score(ev)).tolist() == [True, False, True]
