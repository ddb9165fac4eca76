"""The synthetic generator: deterministic, heavy-tailed, schema-valid, with a usable oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from onerec.data.schema import FLAGS, Dataset
from onerec.data.synthetic import SyntheticConfig, generate, oracle_scores

SMALL = SyntheticConfig(n_users=150, n_items=800, max_history=3000, min_history=10, seed=7)


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(SMALL)


def test_same_seed_same_data(small: Dataset) -> None:
    again = generate(SMALL)
    pd.testing.assert_frame_equal(small.events, again.events)
    pd.testing.assert_frame_equal(small.items, again.items)
    np.testing.assert_array_equal(small.item_content, again.item_content)


def test_other_seed_other_data(small: Dataset) -> None:
    other = generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 8}))
    assert not small.events["item_id"].equals(other.events["item_id"])


def test_history_lengths_reach_the_maximum_and_are_heavy_tailed(small: Dataset) -> None:
    lengths = np.bincount(small.user_index(), minlength=small.n_users)
    assert lengths.max() == SMALL.max_history
    assert lengths.min() >= SMALL.min_history
    # Heavy tail: the top 5% of users hold far more than 5% of the events.
    top = np.sort(lengths)[::-1][: max(1, len(lengths) // 20)]
    assert top.sum() / lengths.sum() > 0.3


def test_schema_is_valid_and_sorted(small: Dataset, tmp_path) -> None:
    small.validate()
    loaded = Dataset.load(small.save(tmp_path / "ds"))
    pd.testing.assert_frame_equal(loaded.events, small.events)
    assert set(FLAGS) <= set(loaded.events.columns)
    assert loaded.ground_truth is not None


def test_feedback_follows_affinity(small: Dataset) -> None:
    """Items inside a user's interests are liked more than items shown by exploration."""
    ev = small.events
    sub = small.ground_truth["item_subtopic"][small.item_index()]
    user = small.user_index()
    # A user's most watched subtopic stands for their interests. Users who have seen a
    # good part of this tiny catalog are left out: novelty pushes them off their interests.
    light = (np.bincount(user, minlength=small.n_users) <= small.n_items // 4)[user]
    counts = pd.crosstab(user, sub)
    top = counts.to_numpy().argmax(axis=1)
    in_top = (sub == counts.columns.to_numpy()[top][user])[light]
    like = ev["like"].to_numpy()[light]
    assert like[in_top].mean() > 1.5 * like[~in_top].mean()
    ratio = (ev["watch_ms"] / ev["duration_ms"]).to_numpy()[light]
    assert ratio[in_top].mean() > ratio[~in_top].mean()


def test_users_rarely_see_an_item_twice(small: Dataset) -> None:
    """Like a short-video feed: repeats only once a user has exhausted the catalog."""
    user, item = small.user_index(), small.item_index()
    lengths = np.bincount(user, minlength=small.n_users)
    repeat = pd.DataFrame({"u": user, "i": item}).duplicated().to_numpy()
    light = (lengths <= small.n_items // 4)[user]
    assert repeat[light].mean() < 0.05
    last = np.cumsum(lengths) - 1  # events are sorted by user, then time
    assert repeat[last].mean() < 0.2


def test_items_carry_hierarchical_topics_and_informative_content(small: Dataset) -> None:
    items = small.items
    assert (items["tag"].str.split("/").str[0] == items["category"]).all()
    sub = small.ground_truth["item_subtopic"]
    c = small.item_content / np.linalg.norm(small.item_content, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(c), (2, 5000))
    sim = (c[a] * c[b]).sum(1)
    assert sim[sub[a] == sub[b]].mean() > sim[sub[a] != sub[b]].mean() + 0.1


def test_oracle_is_a_distribution_that_beats_popularity(small: Dataset) -> None:
    users = np.arange(small.n_users)
    scores = oracle_scores(small.ground_truth, users)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    # The oracle puts more mass on each user's real last item than popularity does.
    last = small.events.groupby("user_id", observed=True)["item_id"].last().cat.codes.to_numpy()
    pop = small.ground_truth["item_popularity"]
    assert np.log(scores[users, last]).mean() > np.log(pop[last]).mean()


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_history"):
        SyntheticConfig(min_history=10, max_history=5)
