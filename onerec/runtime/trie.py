"""A compact trie of the catalog's semantic IDs, for constrained decoding.

Beam search must never emit a SID that no item carries, so at level ``l`` a beam whose
decoded prefix is ``p`` may only extend ``p`` by a code that some real SID has there.

**Layout.** The ``S`` unique SIDs are kept sorted lexicographically in ``sids`` (S, L);
a full SID's *leaf id* is its row there. The distinct length-``l`` prefixes of those SIDs
are level ``l``'s *prefix ids*, numbered in lexicographic order; the root (the empty
prefix) is prefix 0 at level 0. Level ``l`` is a CSR over its prefixes:

* ``offsets[l]`` (P_l + 1,): prefix ``p``'s children are the edges
  ``offsets[l][p] : offsets[l][p + 1]``;
* ``codes[l]`` (E_l,): each edge's code, ascending inside a prefix;
* ``keys[l]`` (E_l,): ``p * K + code``, ascending over the whole level, so ``advance`` is a
  single ``np.searchsorted`` for any number of (prefix, code) pairs.

Because prefixes are numbered lexicographically, the child reached by edge ``e`` is prefix
``e`` at level ``l + 1`` (``P_{l+1} = E_l``), and at the last level edge ``e`` is leaf
``e``: the child ids need no array of their own.

**Leaves.** ``leaf_of`` reads a whole SID as one base-K number and finds it among the
sorted leaves' numbers with a single ``np.searchsorted``; K^L must fit an int64.

**Why CSR.** A dense (prefixes x K) table of allowed codes or child ids is simple, but at
the last level there are up to N prefixes, so it costs N x K x 4 bytes (10M items x 256
codes = 10 GB). The CSR holds one edge per distinct prefix, O(N) over all levels, and
``allowed`` builds the dense (P, K) mask only for the P beams being decoded.

**Files.** ``save`` writes only the sorted SIDs and K; ``load`` checks them and rebuilds
the CSR in O(S), so a file cannot hold a CSR that disagrees with its SIDs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


def _first_difference(sids: np.ndarray) -> np.ndarray:
    """(S,) first level where row ``i`` differs from row ``i - 1``; -1 for row 0.

    Row ``i`` of sorted unique SIDs starts a new length-``m`` prefix iff this is ``< m``.
    """
    neq = sids[1:] != sids[:-1]  # (S - 1, L)
    return np.concatenate([np.full(min(len(sids), 1), -1), np.argmax(neq, axis=1)])


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class SIDTrie:
    """The trie of a catalog's SIDs; see the module docstring for the layout."""

    def __init__(self, sids: np.ndarray, codebook_size: int) -> None:
        """Build from unique SIDs already sorted lexicographically (use :meth:`from_codes`
        for raw item codes). Raises ValueError if they are not."""
        sids = np.asarray(sids)
        if sids.ndim != 2 or sids.shape[1] < 1 or not np.issubdtype(sids.dtype, np.integer):
            raise ValueError(
                f"SIDs must be an (S, L >= 1) integer array, got {sids.dtype} {sids.shape}"
            )
        if codebook_size < 1:
            raise ValueError(f"codebook size must be positive, got {codebook_size}")
        sids = np.ascontiguousarray(sids, dtype=np.int64)
        if sids.size and (sids.min() < 0 or sids.max() >= codebook_size):
            raise ValueError(f"SID codes must lie in [0, {codebook_size})")
        first = _first_difference(sids)  # (S,)
        rows = np.arange(1, len(sids))
        # Equal rows have first == 0 and fail this too.
        if not (sids[rows - 1, first[1:]] < sids[rows, first[1:]]).all():
            raise ValueError("SIDs must be unique and sorted lexicographically")

        self._k = int(codebook_size)
        if self._k ** sids.shape[1] > np.iinfo(np.int64).max:
            raise ValueError(f"{self._k}^{sids.shape[1]} SIDs do not fit the int64 leaf key")
        self._sids = _frozen(sids)
        # A SID read as a base-K number: sorted like the SIDs, so the leaf ids' keys ascend.
        self._place = _frozen(self._k ** np.arange(sids.shape[1] - 1, -1, -1, dtype=np.int64))
        self._leaf_keys = _frozen(sids @ self._place)
        self._offsets: list[np.ndarray] = []
        self._codes: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        n_parents = 1  # the root
        for level in range(sids.shape[1]):
            parent = np.cumsum(first < level) - 1  # (S,) each SID's length-`level` prefix id
            edge_rows = np.flatnonzero(first < level + 1)  # first SID of each child prefix
            edge_parent = parent[edge_rows]  # (E,)
            codes = sids[edge_rows, level]  # (E,)
            offsets = np.zeros(n_parents + 1, np.int64)
            np.cumsum(np.bincount(edge_parent, minlength=n_parents), out=offsets[1:])
            self._offsets.append(_frozen(offsets))
            self._codes.append(_frozen(codes))
            self._keys.append(_frozen(edge_parent * self._k + codes))
            n_parents = len(edge_rows)

    @classmethod
    def from_codes(cls, codes: np.ndarray, codebook_size: int) -> SIDTrie:
        """The trie of items' (N, L) codes; items that share a SID share one leaf."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise ValueError(f"codes must be an (N, L >= 1) array, got {codes.shape}")
        ordered = codes[np.lexsort(codes.T[::-1])]  # lexicographic: column 0 is the primary key
        new = np.ones(len(ordered), dtype=bool)
        new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)  # (N,) drop duplicates
        return cls(ordered[new], codebook_size)

    @property
    def levels(self) -> int:
        return self._sids.shape[1]

    @property
    def codebook_size(self) -> int:
        return self._k

    @property
    def sids(self) -> np.ndarray:
        """(S, L) unique SIDs, sorted; row ``i`` is leaf ``i``. Read-only."""
        return self._sids

    def __len__(self) -> int:
        return len(self._sids)

    def __repr__(self) -> str:
        return f"SIDTrie(sids={len(self)}, levels={self.levels}, K={self._k})"

    def num_prefixes(self, level: int) -> int:
        """How many distinct length-``level`` prefixes (1 at level 0: the root)."""
        return len(self._offsets[level]) - 1

    def allowed(self, level: int, prefix_ids: np.ndarray) -> np.ndarray:
        """(..., K) mask of the codes that extend each level-``level`` prefix.

        A negative prefix id (a dead beam) has no legal code.
        """
        prefix_ids = np.asarray(prefix_ids, dtype=np.int64)
        row, _, code = self.edges(level, prefix_ids)
        out = np.zeros((prefix_ids.size, self._k), dtype=bool)  # (P, K)
        out.ravel()[row * self._k + code] = True
        return out.reshape(*prefix_ids.shape, self._k)

    def edges(
        self, level: int, prefix_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every legal step out of the level-``level`` prefixes ``prefix_ids`` (flattened to
        P), as ``(row, child, code)``: taking ``code`` extends prefix
        ``prefix_ids.flat[row]`` to ``child``, a prefix id at the next level (a leaf id at
        the last). Rows ascend, and a prefix's steps come in code order. A negative prefix
        id (a dead beam) has none."""
        flat = np.asarray(prefix_ids, dtype=np.int64).ravel()  # (P,)
        offsets = self._offsets[level]
        if flat.size and flat.max() >= len(offsets) - 1:
            raise ValueError(f"prefix id {flat.max()} out of range at level {level}")
        live = flat >= 0
        start = offsets[np.where(live, flat, 0)]
        count = offsets[np.where(live, flat + 1, 0)] - start  # (P,) children; 0 if dead
        ends = np.cumsum(count)
        # Edge j of the output belongs to prefix `row` and is its (j - ends[row-1])-th child.
        row = np.repeat(np.arange(len(flat)), count)  # (sum(count),)
        edge = np.arange(ends[-1] if len(ends) else 0) + np.repeat(start - (ends - count), count)
        return row, edge, self._codes[level][edge]

    def advance(self, level: int, prefix_ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Child of each (prefix, code) pair: a level ``level + 1`` prefix id, or a leaf id at
        the last level; -1 where the step is illegal (or the prefix is already -1)."""
        prefix_ids, codes = np.broadcast_arrays(
            np.asarray(prefix_ids, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        )
        keys = self._keys[level]
        ok = (prefix_ids >= 0) & (prefix_ids < self.num_prefixes(level))
        ok &= (codes >= 0) & (codes < self._k)  # else p * K + code could alias another prefix
        if not keys.size:
            return np.full(prefix_ids.shape, -1, np.int64)
        key = np.where(ok, prefix_ids * self._k + codes, 0)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        return np.where(ok & (keys[pos] == key), pos, -1)

    def leaf_of(self, sids: np.ndarray) -> np.ndarray:
        """(M,) leaf id of each of the (M, L) SIDs; -1 for a SID that no item carries."""
        sids = np.asarray(sids)
        if sids.ndim != 2 or sids.shape[1] != self.levels:
            raise ValueError(f"expected (M, {self.levels}) SIDs, got {sids.shape}")
        ok = ((sids >= 0) & (sids < self._k)).all(axis=1)  # else a key could alias a SID
        if not len(self) or not len(sids):
            return np.full(len(sids), -1, np.int64)
        key = np.where(ok, sids.astype(np.int64, copy=False) @ self._place, -1)
        pos = np.minimum(np.searchsorted(self._leaf_keys, key), len(self) - 1)
        return np.where(ok & (self._leaf_keys[pos] == key), pos, -1)

    def contains(self, sids: np.ndarray) -> np.ndarray:
        """(M,) whether each of the (M, L) SIDs belongs to the catalog."""
        return self.leaf_of(sids) >= 0

    def save(self, path: str | Path) -> None:
        """Write a single .npz at exactly ``path``, atomically (a server may be reading it)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    sids=self._sids,
                    codebook_size=np.int64(self._k),
                    format_version=np.int64(_FORMAT_VERSION),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("saved %r to %s", self, path)

    @classmethod
    def load(cls, path: str | Path) -> SIDTrie:
        """Read a file written by :meth:`save`; ValueError if it is corrupt or inconsistent."""
        with open(path, "rb") as f:  # a missing file is FileNotFoundError, not corruption
            try:
                z = np.load(f, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                with z:
                    fields = {name: z[name] for name in ("sids", "codebook_size", "format_version")}
            except (KeyError, OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{path}: not a readable SID trie file ({e})") from e
        version, k = fields["format_version"], fields["codebook_size"]
        for name, value in (("format_version", version), ("codebook_size", k)):
            if value.shape != () or not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"{path}: {name} must be an integer scalar")
        if int(version) != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported trie format {int(version)}")
        try:
            trie = cls(fields["sids"], int(k))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        log.info("loaded %r from %s", trie, path)
        return trie
