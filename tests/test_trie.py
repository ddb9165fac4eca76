"""SIDTrie against a brute-force set of tuples; file round trip and corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onerec.runtime.trie import SIDTrie


def _random_codes(n: int, levels: int, k: int, seed: int) -> np.ndarray:
    """Codes drawn from a few values per level, so that prefixes are shared and items collide."""
    rng = np.random.default_rng(seed)
    spread = rng.integers(1, k + 1, size=levels)
    return rng.integers(0, spread, size=(n, levels))


def test_from_codes_merges_duplicates_and_sorts() -> None:
    codes = np.array([[1, 2, 3], [0, 0, 1], [1, 2, 3], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    trie = SIDTrie.from_codes(codes, 4)
    assert len(trie) == 4
    assert trie.levels == 3 and trie.codebook_size == 4
    assert trie.sids.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 2, 3]]
    assert trie.leaf_of(codes).tolist() == [3, 0, 3, 1, 2, 0]
    assert [trie.num_prefixes(level) for level in range(3)] == [1, 2, 4]
    assert not trie.sids.flags.writeable


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    levels=st.integers(1, 3),
    k=st.integers(2, 16),
    seed=st.integers(0, 2**32 - 1),
)
def test_trie_agrees_with_brute_force(n: int, levels: int, k: int, seed: int) -> None:
    codes = _random_codes(n, levels, k, seed)
    trie = SIDTrie.from_codes(codes, k)
    unique = sorted(set(map(tuple, codes.tolist())))
    # prefixes[l]: the sorted distinct length-l prefixes, whose index is the prefix id.
    prefixes = [sorted({s[:level] for s in unique}) for level in range(levels + 1)]
    ids = [{p: i for i, p in enumerate(ps)} for ps in prefixes]
    assert len(trie) == len(unique)
    assert trie.sids.tolist() == [list(s) for s in unique]

    for level in range(levels):
        n_prefixes = len(prefixes[level])
        assert trie.num_prefixes(level) == n_prefixes
        # Every prefix, plus a dead one (-1), against every code, plus two outside [0, K).
        query = np.arange(-1, n_prefixes)
        mask = trie.allowed(level, query)
        assert mask.shape == (len(query), k)
        assert not mask[0].any()
        pairs_p, pairs_c = np.meshgrid(query, np.arange(-1, k + 1), indexing="ij")
        child = trie.advance(level, pairs_p, pairs_c)
        assert child.shape == pairs_p.shape
        for row, pid in enumerate(query.tolist()):
            if pid < 0:
                assert (child[row] == -1).all()
                continue
            prefix = prefixes[level][pid]
            expected = [ids[level + 1].get((*prefix, c), -1) for c in range(-1, k + 1)]
            assert child[row].tolist() == expected
            assert np.flatnonzero(mask[row]).tolist() == [
                c for c in range(k) if (*prefix, c) in ids[level + 1]
            ]
        # Every step out of each queried prefix, rows ascending and codes in order: each
        # child of the next level appears once, under its parent.
        steps = list(zip(*(a.tolist() for a in trie.edges(level, query)), strict=True))
        assert steps == [
            (row, ids[level + 1][(*prefixes[level][pid], c)], c)
            for row, pid in enumerate(query.tolist())
            if pid >= 0
            for c in range(k)
            if (*prefixes[level][pid], c) in ids[level + 1]
        ]

    rng = np.random.default_rng(seed)
    queries = np.concatenate([codes, rng.integers(-1, k + 1, size=(100, levels))])
    expected_leaf = [ids[levels].get(tuple(q), -1) for q in queries.tolist()]
    assert trie.leaf_of(queries).tolist() == expected_leaf
    assert trie.contains(queries).tolist() == [leaf >= 0 for leaf in expected_leaf]


def test_allowed_keeps_the_query_shape() -> None:
    trie = SIDTrie.from_codes(np.array([[0, 1], [0, 3], [2, 0]]), 4)
    mask = trie.allowed(1, np.array([[0, 1], [-1, 0]]))
    assert mask.shape == (2, 2, 4)
    assert mask[0, 0].tolist() == [False, True, False, True]
    assert mask[0, 1].tolist() == [True, False, False, False]
    assert not mask[1, 0].any()
    with pytest.raises(ValueError, match="out of range"):
        trie.allowed(1, np.array([2]))


def test_empty_catalog_allows_nothing() -> None:
    trie = SIDTrie.from_codes(np.zeros((0, 3), np.int64), 8)
    assert len(trie) == 0
    assert not trie.allowed(0, np.array([0])).any()
    assert trie.leaf_of(np.zeros((2, 3), np.int64)).tolist() == [-1, -1]


@pytest.mark.parametrize(
    ("codes", "k"),
    [
        (np.array([0, 1, 2]), 4),  # not 2-D
        (np.array([[0, 4]]), 4),  # code >= K
        (np.array([[0, -1]]), 4),  # negative code
        (np.array([[0.0, 1.0]]), 4),  # not integer
        (np.array([[0, 1]]), 0),  # no codebook
        (np.zeros((1, 8), np.int64), 256),  # 256^8 SIDs overflow the int64 leaf key
    ],
)
def test_from_codes_rejects_bad_input(codes: np.ndarray, k: int) -> None:
    with pytest.raises(ValueError):
        SIDTrie.from_codes(codes, k)


@pytest.mark.parametrize("sids", [[[1, 0], [0, 1]], [[0, 1], [0, 1]]])
def test_constructor_requires_sorted_unique_sids(sids: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="unique and sorted"):
        SIDTrie(np.array(sids), 4)


def test_save_load_round_trip(tmp_path) -> None:
    codes = _random_codes(500, 3, 16, seed=7)
    trie = SIDTrie.from_codes(codes, 16)
    path = tmp_path / "trie"  # no .npz suffix: the file must land at exactly this path
    trie.save(path)
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["trie"]  # no temporary left behind
    loaded = SIDTrie.load(path)
    assert loaded.codebook_size == 16 and loaded.levels == 3
    np.testing.assert_array_equal(loaded.sids, trie.sids)
    np.testing.assert_array_equal(loaded.leaf_of(codes), trie.leaf_of(codes))
    for level in range(3):
        prefixes = np.arange(trie.num_prefixes(level))
        np.testing.assert_array_equal(
            loaded.allowed(level, prefixes), trie.allowed(level, prefixes)
        )


def _write_npz(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


_GOOD = {
    "sids": np.array([[0, 1], [2, 3]]),
    "codebook_size": np.int64(4),
    "format_version": np.int64(1),
}


@pytest.mark.parametrize(
    "corrupt",
    [
        "garbage",
        "truncated",
        "npy",
        "missing_key",
        "sids_1d",
        "sids_float",
        "unsorted",
        "code_out_of_range",
        "k_not_scalar",
        "wrong_version",
    ],
)
def test_corrupt_file_is_rejected(tmp_path, corrupt: str) -> None:
    path = tmp_path / "trie.npz"
    if corrupt == "garbage":
        path.write_bytes(b"definitely not a zip archive" * 10)
    elif corrupt == "truncated":
        SIDTrie.from_codes(_random_codes(200, 3, 16, seed=1), 16).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif corrupt == "npy":
        with open(path, "wb") as f:  # a plain .npy array under the .npz name
            np.save(f, _GOOD["sids"], allow_pickle=False)
    else:
        fields = dict(_GOOD)
        if corrupt == "missing_key":
            del fields["codebook_size"]
        elif corrupt == "sids_1d":
            fields["sids"] = np.array([0, 1, 2])
        elif corrupt == "sids_float":
            fields["sids"] = fields["sids"].astype(np.float64)
        elif corrupt == "unsorted":
            fields["sids"] = fields["sids"][::-1]
        elif corrupt == "code_out_of_range":
            fields["codebook_size"] = np.int64(3)
        elif corrupt == "k_not_scalar":
            fields["codebook_size"] = np.array([4, 4])
        elif corrupt == "wrong_version":
            fields["format_version"] = np.int64(99)
        _write_npz(path, **fields)
    with pytest.raises(ValueError):
        SIDTrie.load(path)


def test_good_hand_written_file_loads(tmp_path) -> None:
    """The corrupt cases above differ from this one file in one field each."""
    _write_npz(tmp_path / "trie.npz", **_GOOD)
    assert SIDTrie.load(tmp_path / "trie.npz").sids.tolist() == [[0, 1], [2, 3]]


def test_missing_file_is_not_reported_as_corrupt(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        SIDTrie.load(tmp_path / "absent.npz")
