"""The user simulator answers like the generator: its feedback on the logged (user, item)
pairs matches the logged feedback, and it ranks what users like above what they don't."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from onerec.data.schema import Dataset
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.runtime.engagement import WATCH_CAP, engagement_score, watch_ratio
from onerec.simulator import UserSimulator

# 1000 users give ~17k final-session events: enough that a simulator with the wrong users'
# interests misses the logged click and like counts by ~10 standard deviations.
CFG = SyntheticConfig(n_users=1000, n_items=2000, max_history=3000, seed=3)
BINARY = ("click", "like", "follow", "comment", "forward", "hate")


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return generate(CFG)


@pytest.fixture(scope="module")
def sim(ds: Dataset) -> UserSimulator:
    return UserSimulator.from_dataset(ds)


@pytest.fixture(scope="module")
def final(ds: Dataset) -> np.ndarray:
    """Events of each user's last session: drawn at exactly the final interest state."""
    user = ds.user_index()
    start = np.searchsorted(user, user)  # events are sorted by user, then time
    session = (np.arange(len(user)) - start) // CFG.session_length
    last = np.zeros(ds.n_users, np.int64)
    np.maximum.at(last, user, session)
    return np.flatnonzero(session == last[user])


def _within_sampling_error(observed: np.ndarray, p: np.ndarray) -> None:
    """|count - sum p| <= 4 standard deviations of a sum of independent Bernoullis."""
    sd = np.sqrt((p * (1 - p)).sum())
    assert abs(observed.sum() - p.sum()) <= 4 * sd + 1e-9, (observed.sum(), p.sum(), sd)


@pytest.mark.parametrize("flag", BINARY)
def test_logged_and_sampled_flags_match_the_expected_rates(
    ds: Dataset, sim: UserSimulator, final: np.ndarray, flag: str
) -> None:
    users, items = ds.user_index()[final], ds.item_index()[final]
    p = sim.expected(users, items)[flag]
    _within_sampling_error(ds.events[flag].to_numpy()[final], p)
    _within_sampling_error(sim.sample(users, items, seed=11)[flag], p)


@pytest.mark.parametrize("term", ["watch_ratio", "watch"])
def test_logged_and_sampled_watch_match_the_expected_mean(
    ds: Dataset, sim: UserSimulator, final: np.ndarray, term: str
) -> None:
    users, items = ds.user_index()[final], ds.item_index()[final]
    expected = sim.expected(users, items)[term].mean()
    sample = sim.sample(users, items, seed=12)
    for watch_ms, duration_ms in (
        (ds.events["watch_ms"].to_numpy()[final], ds.events["duration_ms"].to_numpy()[final]),
        (sample["watch_ms"], sample["duration_ms"]),
    ):
        ratio = watch_ratio(watch_ms, duration_ms)
        if term == "watch":
            ratio = np.clip(ratio, 0.0, WATCH_CAP) / WATCH_CAP
        assert abs(ratio.mean() - expected) <= 4 * ratio.std() / np.sqrt(len(ratio))


def test_expected_engagement_is_the_mean_sampled_score(ds: Dataset, sim: UserSimulator) -> None:
    users = np.repeat(np.arange(20), 2000)
    items = np.tile(np.arange(20) * 50, 2000)
    sample = engagement_score(sim.sample(users, items, seed=5))
    expected = sim.engagement(users, items)
    assert abs(sample.mean() - expected.mean()) <= 4 * sample.std() / np.sqrt(len(sample))


def test_shapes_broadcast(sim: UserSimulator) -> None:
    users, items = np.arange(4), np.arange(7)
    grid = sim.affinity(users[:, None], items[None, :])
    assert grid.shape == (4, 7)
    np.testing.assert_allclose(grid[2], sim.affinity(np.full(7, 2), items))
    assert sim.sample(users[:, None], items[None, :], seed=0)["like"].shape == (4, 7)
    lists = np.array([[1, 2, -1], [-1, -1, -1], [3, 3, 3], [0, 5, 6]])
    got = sim.list_engagement(users, lists)
    assert np.isnan(got[1])
    np.testing.assert_allclose(got[0], sim.engagement(np.zeros(2, int), np.array([1, 2])).mean())


def test_simulator_prefers_what_users_chose(
    ds: Dataset, sim: UserSimulator, final: np.ndarray
) -> None:
    """Logged items come mostly from a user's interests, so a right simulator scores them
    above the catalog average for most users (one with users shuffled: about half)."""
    user, item = ds.user_index(), ds.item_index()
    u = user[final]
    pos = np.arange(len(final)) - np.searchsorted(u, u)
    logged = np.full((ds.n_users, CFG.session_length), -1)  # final-session items, padded
    logged[u, pos] = item[final]
    users = np.arange(ds.n_users)
    catalog = sim.engagement(users[:, None], np.arange(ds.n_items)[None, :]).mean(axis=1)
    assert (sim.list_engagement(users, logged) > catalog).mean() > 0.65


def test_oracle_top_beats_the_logged_items_and_skips_seen_ones(
    ds: Dataset, sim: UserSimulator, final: np.ndarray
) -> None:
    user, item = ds.user_index(), ds.item_index()
    users, k = np.arange(ds.n_users), 10
    seen = sp.csr_array((np.ones(len(item)), (user, item)), shape=(ds.n_users, ds.n_items))
    top = sim.oracle_top(users, k, exclude=seen)
    assert top.shape == (ds.n_users, k)
    unseen = ds.n_items - np.diff(seen.indptr)
    np.testing.assert_array_equal(top >= 0, np.arange(k) < unseen[:, None])  # -1 pads
    rows, cols = np.nonzero(top >= 0)
    assert not seen[rows, top[rows, cols]].any()
    scores = sim.engagement(users[:, None], top)
    assert (np.diff(scores, axis=1)[top[:, 1:] >= 0] <= 0).all()  # best first

    # Users who have seen a good part of this small catalog have only leftovers to get.
    light = np.flatnonzero(unseen >= 0.75 * ds.n_items)
    logged = sim.engagement(user[final], item[final])
    logged_mean = np.bincount(user[final], logged, ds.n_users) / np.bincount(user[final])
    assert (sim.list_engagement(light, top[light]) > logged_mean[light]).all()

    as_lists = sim.oracle_top(users, k, exclude=np.split(item, np.searchsorted(user, users[1:])))
    np.testing.assert_array_equal(as_lists, top)


def test_ground_truth_round_trips_and_is_required(ds: Dataset, tmp_path) -> None:
    loaded = Dataset.load(ds.save(tmp_path / "ds"))
    assert loaded.ground_truth is not None
    for key, value in ds.ground_truth.items():
        np.testing.assert_array_equal(loaded.ground_truth[key], value)
    users, items = np.arange(5)[:, None], np.arange(9)[None, :]
    np.testing.assert_array_equal(
        UserSimulator.from_dataset(loaded).engagement(users, items),
        UserSimulator.from_dataset(ds).engagement(users, items),
    )
    loaded.ground_truth = None
    with pytest.raises(ValueError, match="ground truth"):
        UserSimulator.from_dataset(loaded)
