"""Constrained beam search: catalog-only output, exactness, exclusions, ties, independence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.runtime.beam_search import (
    LOGP_FLOOR,
    BeamResult,
    StepFn,
    constrained_beam_search,
    exclude_leaves,
)
from onerec.runtime.trie import SIDTrie

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread uint64 hash, vectorised."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hashed_step(users: np.ndarray, k: int, seed: int = 0) -> StepFn:
    """Log-probabilities that are a pseudo-random function of (user, decoded prefix).

    Request b is user ``users[b]``, so the same user gets the same scores at any position
    in any batch, and a search that mixes up prefixes gets different scores.
    """
    users = np.asarray(users, dtype=np.uint64)

    def step(tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray:
        n_req, width, t = tokens.shape
        h = np.broadcast_to(users[:, None] ^ np.uint64(seed), (n_req, width))  # (B, W)
        h = _mix(h + np.uint64(0x9E3779B97F4A7C15))
        for j in range(t):
            h = _mix(h * np.uint64(k + 1) + tokens[..., j].astype(np.uint64) + np.uint64(1))
        x = _mix(h[..., None] * np.uint64(k) + np.arange(k, dtype=np.uint64))  # (B, W, K)
        logits = (x >> np.uint64(40)).astype(np.float64) / 2.0**24 * 6.0
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return logp.astype(np.float32)

    return step


def _prefix_ids(trie: SIDTrie, tokens: np.ndarray) -> np.ndarray:
    """(B, W) trie prefix id of each decoded (B, W, t) prefix; -1 off the trie."""
    node = np.zeros(tokens.shape[:2], np.int64)
    for level in range(tokens.shape[2]):
        node = trie.advance(level, node, tokens[..., level])
    return node


def adversarial_step(trie: SIDTrie, legal_value: float, illegal_value: float) -> StepFn:
    """Puts the model's mass where the trie forbids it: ``illegal_value`` on illegal codes."""

    def step(tokens: np.ndarray, parents: np.ndarray | None = None) -> np.ndarray:
        legal = trie.allowed(tokens.shape[2], _prefix_ids(trie, tokens))  # (B, W, K)
        return np.where(legal, legal_value, illegal_value).astype(np.float32)

    return step


def zero_step(k: int) -> StepFn:
    """Every code equally likely: every candidate ties."""
    return lambda tokens, parents=None: np.zeros((*tokens.shape[:2], k), np.float32)


def _catalog(n: int, levels: int, k: int, seed: int) -> SIDTrie:
    rng = np.random.default_rng(seed)
    spread = rng.integers(1, k + 1, size=levels)  # shared prefixes, collisions
    return SIDTrie.from_codes(rng.integers(0, spread, size=(n, levels)), k)


def _path_scores(step: StepFn, sids: np.ndarray, n_req: int) -> np.ndarray:
    """(B, S) float32 total log-probability of every SID for every request, summed in the
    search's order."""
    total = np.zeros((n_req, len(sids)), np.float32)
    for level in range(sids.shape[1]):
        tokens = np.broadcast_to(sids[None, :, :level], (n_req, *sids[:, :level].shape))
        logp = step(np.ascontiguousarray(tokens))  # (B, S, K)
        picked = logp[:, np.arange(len(sids)), sids[:, level]]  # (B, S)
        total = total + np.fmax(picked, np.float32(LOGP_FLOOR))
    return total


def _check_well_formed(result: BeamResult, trie: SIDTrie, n_req: int, width: int) -> None:
    """Shapes, catalog membership, ordering, no duplicates and the invalid-beam padding."""
    assert result.sids.shape == (n_req, width, trie.levels)
    assert result.scores.shape == result.valid.shape == (n_req, width)
    assert result.sids.dtype == np.int64 and result.scores.dtype == np.float32
    assert trie.contains(result.sids[result.valid]).all()
    assert (result.sids[~result.valid] == -1).all()
    assert np.isneginf(result.scores[~result.valid]).all()
    assert np.isfinite(result.scores[result.valid]).all()
    for b in range(n_req):
        n_valid = int(result.valid[b].sum())
        assert result.valid[b, :n_valid].all()  # valid beams come first
        assert (np.diff(result.scores[b, :n_valid]) <= 0).all()
        assert len(np.unique(result.sids[b, :n_valid], axis=0)) == n_valid


def _ranked(sids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by score descending, ties by SID: a ranking that does not depend on tie rules."""
    order = np.lexsort((*sids.T[::-1], -scores))
    return sids[order], scores[order]


# (a) Only catalog SIDs, whatever the scores, with as many beams as the catalog allows.


@pytest.mark.parametrize("n_items", [40, 5_000])
@pytest.mark.parametrize("kind", ["hashed", "mass_on_illegal", "nan_on_legal", "zeros"])
def test_every_valid_beam_is_in_the_catalog(n_items: int, kind: str) -> None:
    k, width, n_req = 256, 512, 4
    rng = np.random.default_rng(n_items)
    trie = SIDTrie.from_codes(rng.integers(0, k, size=(n_items, 3)), k)
    steps = {
        "hashed": hashed_step(np.arange(n_req), k),
        "mass_on_illegal": adversarial_step(trie, -np.inf, 0.0),
        "nan_on_legal": adversarial_step(trie, np.nan, np.inf),
        "zeros": zero_step(k),
    }
    for seed in range(3):  # 12 requests per case
        step = hashed_step(np.arange(n_req) + 10 * seed, k) if kind == "hashed" else steps[kind]
        result = constrained_beam_search(step, n_req, width, trie)
        _check_well_formed(result, trie, n_req, width)
        assert (result.valid.sum(axis=1) == min(width, len(trie))).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 400),
    k=st.integers(2, 16),
    levels=st.integers(1, 3),
    width=st.sampled_from([1, 2, 3, 8, 33]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_catalogs_and_widths(n: int, k: int, levels: int, width: int, seed: int) -> None:
    trie = _catalog(n, levels, k, seed)
    step = hashed_step(np.array([seed, seed + 1]), k)
    result = constrained_beam_search(step, 2, width, trie)
    _check_well_formed(result, trie, 2, width)
    assert (result.valid.sum(axis=1) == min(width, len(trie))).all()
    # Scores are the path sums of the SIDs returned: prefixes were tracked right.
    for b in range(2):
        sids = result.sids[b, result.valid[b]]
        expected = _path_scores(step, sids, 2)[b]
        np.testing.assert_array_equal(result.scores[b, result.valid[b]], expected)


# (b) Exactness: with W >= #SIDs the search must find the true ranking of the whole catalog.


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(2, 16),
    levels=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_wide_search_equals_brute_force(n: int, k: int, levels: int, seed: int) -> None:
    trie = _catalog(n, levels, k, seed)
    n_req, width = 3, 320
    step = hashed_step(np.arange(n_req) + seed, k, seed=seed)
    result = constrained_beam_search(step, n_req, width, trie)
    truth = _path_scores(step, trie.sids, n_req)  # (B, S)
    for b in range(n_req):
        assert result.valid[b].sum() == len(trie)
        got = _ranked(result.sids[b, : len(trie)], result.scores[b, : len(trie)])
        want = _ranked(trie.sids, truth[b])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# (c) Exclusions.


def test_exclusions_are_never_returned_and_touch_only_their_request() -> None:
    k, n_req, width = 64, 5, 128
    rng = np.random.default_rng(3)
    trie = SIDTrie.from_codes(rng.integers(0, [8, 8, k], size=(2_000, 3)), k)
    step = hashed_step(np.arange(n_req), k)
    plain = constrained_beam_search(step, n_req, width, trie)
    absent = np.array([[k - 1, k - 1, k - 1]])  # no item carries it: dropped
    assert not trie.contains(absent).any()
    per_request = [
        plain.sids[0, :50],  # the request's own best 50
        np.zeros((0, 3), np.int64),  # nothing
        trie.sids[rng.choice(len(trie), 300, replace=False)],
        np.concatenate([plain.sids[3, ::2], absent]),
        np.zeros((0, 3), np.int64),
    ]
    exclude = exclude_leaves(trie, per_request)
    assert exclude.shape[0] == n_req and (exclude[1] == -1).all()
    assert (exclude[3] >= 0).sum() == width // 2  # the absent SID was dropped
    result = constrained_beam_search(step, n_req, width, trie, exclude)
    _check_well_formed(result, trie, n_req, width)
    for b in range(n_req):
        leaves = trie.leaf_of(result.sids[b, result.valid[b]])
        assert not np.isin(leaves, exclude[b][exclude[b] >= 0]).any()
    np.testing.assert_array_equal(result.sids[0, : width - 50], plain.sids[0, 50:])
    for b in (1, 4):  # no exclusions: exactly as without any
        np.testing.assert_array_equal(result.sids[b], plain.sids[b])
        np.testing.assert_array_equal(result.scores[b], plain.scores[b])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(2, 12), seed=st.integers(0, 2**32 - 1))
def test_wide_search_with_exclusions_equals_brute_force(n: int, k: int, seed: int) -> None:
    trie = _catalog(n, 3, k, seed)
    rng = np.random.default_rng(seed)
    n_req, width = 2, 256
    per_request = [trie.sids[rng.random(len(trie)) < 0.3] for _ in range(n_req)]
    exclude = exclude_leaves(trie, per_request)
    step = hashed_step(np.arange(n_req), k, seed=seed)
    result = constrained_beam_search(step, n_req, width, trie, exclude)
    truth = _path_scores(step, trie.sids, n_req)
    for b in range(n_req):
        keep = ~np.isin(np.arange(len(trie)), exclude[b])
        n_valid = int(keep.sum())
        assert result.valid[b].sum() == n_valid
        got = _ranked(result.sids[b, :n_valid], result.scores[b, :n_valid])
        want = _ranked(trie.sids[keep], truth[b, keep])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_exclude_leaves_pads_and_deduplicates() -> None:
    trie = SIDTrie.from_codes(np.array([[0, 0], [0, 1], [1, 1]]), 2)
    out = exclude_leaves(trie, [np.array([[1, 1], [0, 0], [1, 1]]), np.array([[1, 0]])])
    assert out.tolist() == [[0, 2, -1], [-1, -1, -1]]
    assert exclude_leaves(trie, []).shape == (0, 0)
    padded = exclude_leaves(trie, [np.array([[0, 1], [-1, -1], [-1, 1]])])  # a client's padding
    assert padded.tolist() == [[1, -1, -1]]


def test_bad_exclude_is_rejected() -> None:
    trie = SIDTrie.from_codes(np.array([[0, 0], [0, 1]]), 2)
    with pytest.raises(ValueError, match="leaf ids"):
        constrained_beam_search(zero_step(2), 2, 4, trie, np.array([0, 1]))
    with pytest.raises(ValueError, match="leaf id 2"):
        constrained_beam_search(zero_step(2), 1, 4, trie, np.array([[2]]))


# (d) Determinism and tie-breaking.


def test_identical_runs_give_identical_output() -> None:
    k = 256
    trie = SIDTrie.from_codes(np.random.default_rng(1).integers(0, k, size=(3_000, 3)), k)
    step = hashed_step(np.arange(4), k)
    a = constrained_beam_search(step, 4, 512, trie)
    b = constrained_beam_search(step, 4, 512, trie)
    np.testing.assert_array_equal(a.sids, b.sids)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.valid, b.valid)


@pytest.mark.parametrize("width", [1, 7, 100, 1000])
def test_ties_go_to_the_lowest_sid(width: int) -> None:
    """All-equal scores: the flat-index rule makes the result the catalog's first W SIDs."""
    k = 16
    trie = _catalog(600, 3, k, seed=5)
    result = constrained_beam_search(zero_step(k), 3, width, trie)
    n_valid = min(width, len(trie))
    for b in range(3):
        np.testing.assert_array_equal(result.sids[b, :n_valid], trie.sids[:n_valid])


# (e) No duplicate beams, even when the first level has fewer codes than beams.


def test_no_duplicates_when_the_root_has_few_children() -> None:
    k = 256
    codes = np.random.default_rng(2).integers(0, k, size=(1_000, 3))
    codes[:, 0] %= 3  # three root children, 512 beams
    trie = SIDTrie.from_codes(codes, k)
    result = constrained_beam_search(hashed_step(np.arange(2), k), 2, 512, trie)
    _check_well_formed(result, trie, 2, 512)  # includes the no-duplicates check
    assert (result.valid.sum(axis=1) == 512).all()


# (f) Batch independence.


def test_a_request_does_not_depend_on_its_batch() -> None:
    k, width = 32, 64
    trie = _catalog(3_000, 3, k, seed=9)
    users = np.array([11, 22, 33, 44, 55])
    together = constrained_beam_search(hashed_step(users, k), len(users), width, trie)
    perm = np.array([3, 0, 4, 2, 1])
    shuffled = constrained_beam_search(hashed_step(users[perm], k), len(users), width, trie)
    for i, user in enumerate(users):
        alone = constrained_beam_search(hashed_step(np.array([user]), k), 1, width, trie)
        np.testing.assert_array_equal(together.sids[i], alone.sids[0])
        np.testing.assert_array_equal(together.scores[i], alone.scores[0])
    np.testing.assert_array_equal(shuffled.sids, together.sids[perm])
    np.testing.assert_array_equal(shuffled.scores, together.scores[perm])


def test_per_request_widths_equal_separate_searches() -> None:
    """A mixed-width batch (how Triton batches requests) is each request at its own width."""
    k = 32
    trie = _catalog(3_000, 3, k, seed=4)
    users = np.array([5, 6, 7, 8])
    widths = np.array([64, 1, 200, 17])
    mixed = constrained_beam_search(hashed_step(users, k), len(users), widths, trie)
    assert mixed.sids.shape == (4, 200, 3)
    for i, (user, w) in enumerate(zip(users, widths, strict=True)):
        alone = constrained_beam_search(hashed_step(np.array([user]), k), 1, int(w), trie)
        np.testing.assert_array_equal(mixed.sids[i, :w], alone.sids[0])
        np.testing.assert_array_equal(mixed.scores[i, :w], alone.scores[0])
        assert not mixed.valid[i, w:].any()


def test_final_expand_returns_every_best_completion_of_the_last_beams() -> None:
    """``final_expand`` keeps more SIDs from the same decoder steps: the first W are the
    plain search's, and all of them are the best completions of the plain search's
    last-level prefixes (brute force over those prefixes' legal codes)."""
    k, width, expand = 16, 8, 4
    trie = _catalog(2_000, 3, k, seed=6)
    users = np.array([3, 4, 9])
    widths = np.array([8, 3, 8])
    plain = constrained_beam_search(hashed_step(users, k), len(users), widths, trie)
    wide = constrained_beam_search(
        hashed_step(users, k), len(users), widths, trie, final_expand=expand
    )
    _check_well_formed(wide, trie, len(users), width * expand)
    for b, w in enumerate(widths):
        np.testing.assert_array_equal(wide.sids[b, :w], plain.sids[b, :w])
        np.testing.assert_array_equal(wide.scores[b, :w], plain.scores[b, :w])
    level_two = constrained_beam_search(
        hashed_step(users, k), len(users), widths, SIDTrie.from_codes(trie.sids[:, :2], k)
    )
    for b, w in enumerate(widths):
        prefixes = {tuple(p) for p in level_two.sids[b][level_two.valid[b]]}
        reachable = np.array([s for s in np.unique(trie.sids, axis=0) if tuple(s[:2]) in prefixes])
        scores = _path_scores(hashed_step(users[b : b + 1], k), reachable, 1)[0]
        best, best_scores = _ranked(reachable, scores)
        n = min(int(w) * expand, len(best))
        assert wide.valid[b].sum() == n
        got, got_scores = _ranked(wide.sids[b, :n], wide.scores[b, :n])
        np.testing.assert_array_equal(got, best[:n])
        np.testing.assert_allclose(got_scores, best_scores[:n], rtol=1e-6)
    with pytest.raises(ValueError, match="final_expand"):
        constrained_beam_search(zero_step(k), 1, 4, trie, final_expand=0)


def test_bad_widths_are_rejected() -> None:
    trie = _catalog(100, 3, 8, seed=1)
    with pytest.raises(ValueError, match="beam widths"):
        constrained_beam_search(zero_step(8), 2, np.array([4, 0]), trie)


# Edges and the step-function contract.


def test_first_level_sees_empty_prefixes_and_every_step_sees_full_width() -> None:
    k, width, n_req = 8, 5, 2
    trie = _catalog(50, 3, k, seed=0)
    shapes: list[tuple[int, ...]] = []

    def step(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        shapes.append(tokens.shape)
        assert tokens.dtype == np.int64
        assert tokens.min(initial=0) >= 0 and tokens.max(initial=0) < k  # in-range tokens
        return zero_step(k)(tokens)

    constrained_beam_search(step, n_req, width, trie)
    assert shapes == [(n_req, width, t) for t in range(3)]


def test_empty_catalog_and_empty_batch() -> None:
    trie = SIDTrie.from_codes(np.zeros((0, 3), np.int64), 4)
    result = constrained_beam_search(zero_step(4), 2, 3, trie)
    assert not result.valid.any() and (result.sids == -1).all()
    trie = _catalog(10, 3, 4, seed=0)
    result = constrained_beam_search(zero_step(4), 0, 3, trie)
    assert result.sids.shape == (0, 3, 3)


def test_wrong_step_output_shape_is_rejected() -> None:
    trie = _catalog(10, 3, 4, seed=0)
    with pytest.raises(ValueError, match="step_fn returned"):
        constrained_beam_search(lambda t, p: np.zeros((2, 3, 5), np.float32), 2, 3, trie)


def test_parents_name_each_beams_prefix_in_the_previous_call() -> None:
    """A decoder with a cache sees only its own state and ``parents``: following them, it
    must rebuild exactly the prefixes the search passes, at every level and width."""
    k, n_req, width = 12, 3, 40
    trie = _catalog(600, 3, k, seed=5)
    scores = hashed_step(np.arange(n_req), k)
    state: list[np.ndarray] = []  # the prefixes as the cache would hold them

    def cached(tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        if parents is None:
            assert tokens.shape[2] == 0
            state[:] = [tokens]
        else:
            rows = np.arange(tokens.shape[0])[:, None]
            rebuilt = np.concatenate([state[0][rows, parents], tokens[..., -1:]], axis=2)
            alive = (tokens >= 0).all(axis=2)
            np.testing.assert_array_equal(rebuilt[alive], tokens[alive])
            state[:] = [tokens]
        return scores(tokens)

    cached_result = constrained_beam_search(cached, n_req, width, trie)
    plain = constrained_beam_search(scores, n_req, width, trie)
    np.testing.assert_array_equal(cached_result.sids, plain.sids)
