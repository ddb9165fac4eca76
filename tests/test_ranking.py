"""The ranking stage: decoded candidates ordered by SID log-probability plus the user
vector's score (onerec.runtime.ranking), offline and in the front end's catalog step."""

from __future__ import annotations

import numpy as np

from onerec.runtime import catalog
from onerec.runtime.catalog import ItemSIDs, collision_ranks
from onerec.runtime.ranking import rank_candidates
from server.catalog import CatalogReader


def test_candidates_are_ordered_by_sid_log_probability_plus_the_users_score() -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 8)).astype(np.float32)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    tokens = rng.integers(1, 30, (3, 12))
    logp = -rng.exponential(3.0, (3, 12)).astype(np.float32)
    order, scores = rank_candidates(users, table, tokens, logp)
    expected = logp + np.einsum("bmd,bd->bm", table[tokens], users)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert sorted(order[0].tolist()) == list(range(12))
    beam_only, _ = rank_candidates(np.zeros_like(users), table, tokens, logp)
    assert not (beam_only == order).all()  # the user's score does reorder


def test_empty_slots_go_last_and_ties_keep_the_beam_order() -> None:
    table = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], np.float32)
    users = np.array([[1, 0]], np.float32)
    tokens = np.array([[1, -1, 2, 1, 3, -1]])  # token 1 twice: equal scores
    order, scores = rank_candidates(users, table, tokens, np.zeros((1, 6), np.float32))
    assert order[0].tolist() == [4, 2, 0, 3, 1, 5]
    assert scores[0, :4].tolist() == [3, 2, 1, 1]
    assert np.isneginf(scores[0, 4:]).all()


def test_front_end_ranks_a_sids_items_each_by_its_own_score(tmp_path) -> None:
    """Items sharing a SID share its log-probability but not their score; seen items go,
    items the model never saw use the table's unknown row."""
    codes = np.array([[0, 0, 0], [0, 0, 0], [1, 2, 3], [2, 2, 2]])
    ids = np.array(["a", "b", "c", "new"])
    popularity = np.array([5, 9, 3, 0])
    items = ItemSIDs(ids, codes, collision_ranks(codes, popularity), popularity)
    catalog.publish(tmp_path, items, 4)
    model_items = {"a": 0, "b": 1, "c": 2}  # "new" arrived after training
    table = np.array([[0, 0], [1, 0], [4, 0], [0.5, 0], [3, 0]], np.float32)  # pad, a, b, c, ?
    view = CatalogReader(tmp_path, model_items, table).get()
    sids = np.array([[0, 0, 0], [1, 2, 3], [2, 2, 2], [-1, -1, -1]])
    logp = np.array([-1.0, -2.0, -4.0, -np.inf], np.float32)
    user = np.array([1.0, 0.0], np.float32)
    rows, scores, illegal = view.rank(sids, logp, user, np.zeros(0, np.int64), np.array([]), 10)
    assert view.item_ids[rows].tolist() == ["b", "a", "new", "c"]
    np.testing.assert_allclose(scores, [-1 + 4, -1 + 1, -4 + 3, -2 + 0.5])
    assert illegal == 0
    rows, _, _ = view.rank(sids, logp, user, np.array([1]), np.array(["new"]), 2)  # b seen
    assert view.item_ids[rows].tolist() == ["a", "c"]


def test_the_search_excludes_a_sid_only_when_all_its_items_are_avoided(tmp_path) -> None:
    """a and b share a SID: seeing a leaves b searchable; seeing both excludes the SID."""
    codes = np.array([[0, 0, 0], [0, 0, 0], [1, 2, 3], [2, 2, 2]])
    ids = np.array(["a", "b", "c", "d"])
    popularity = np.array([5, 9, 3, 1])
    catalog.publish(
        tmp_path, ItemSIDs(ids, codes, collision_ranks(codes, popularity), popularity), 4
    )
    view = CatalogReader(tmp_path, {i: n for n, i in enumerate(ids)}, np.zeros((6, 2))).get()
    row = {item: view.row_by_id[item] for item in ids}
    assert view.exclusion_sids(np.array([row["a"], row["c"]])).tolist() == [[1, 2, 3]]
    both = np.array([row["a"], row["b"], row["b"], row["d"]])  # repeats count once
    assert view.exclusion_sids(both).tolist() == [[0, 0, 0], [2, 2, 2]]
    assert view.exclusion_sids(np.zeros(0, np.int64)).shape == (0, 3)
