"""The served catalog: versioned files that the decoder and the front end read together.

A catalog directory holds immutable versions and a pointer to the live one::

    catalog/
      CURRENT            "7\\n": the live version, replaced atomically (os.replace)
      v000007/
        items.npz        item_ids, codes (N, L), collision_rank, popularity
        trie.npz         the SIDTrie of those items' SIDs

:func:`publish` writes a complete version directory first and flips ``CURRENT`` last, so
a reader sees either the old catalog or the new one, never half of one. The Triton
decoder polls ``CURRENT`` with one ``stat`` per batch (:class:`TrieWatcher`) and swaps
the trie in between batches; it returns the version it decoded with, so the front end
maps those SIDs with the same version's items. That is how an added item becomes
reachable and a removed one can never come back, without restarting anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.runtime.trie import SIDTrie

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
KEEP_VERSIONS = 5  # older versions are deleted on publish; readers hold theirs in memory


@dataclass(frozen=True)
class ItemSIDs:
    """Every item's SID and its rank among the items that share it."""

    item_ids: np.ndarray  # (N,) str
    codes: np.ndarray  # (N, L) int
    collision_rank: np.ndarray  # (N,) int, 0 = the SID's primary item
    popularity: np.ndarray  # (N,) interaction count

    def save(self, path: Path) -> None:
        np.savez(
            path,
            item_ids=self.item_ids.astype(str),
            codes=self.codes.astype(np.int64),
            collision_rank=self.collision_rank.astype(np.int64),
            popularity=self.popularity.astype(np.int64),
        )

    @classmethod
    def load(cls, path: Path) -> ItemSIDs:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["item_ids"], z["codes"], z["collision_rank"], z["popularity"])


def collision_ranks(codes: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """Rank of each item inside its full SID: 0 for the most popular, ties by catalog order.
    The rule that decides which of several items sharing a SID is recommended first."""
    n = len(codes)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.ravel()
    order = np.lexsort((np.arange(n), -np.asarray(popularity, np.float64), group))
    g = group[order]
    start = np.searchsorted(g, g, side="left")
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n) - start
    return ranks


def _version_dir(directory: Path, version: int) -> Path:
    return directory / f"v{version:06d}"


@dataclass(frozen=True)
class CatalogVersion:
    version: int
    items: ItemSIDs
    trie: SIDTrie


def current_version(directory: str | Path) -> int:
    """The live version number; FileNotFoundError when nothing was published."""
    text = (Path(directory) / CURRENT).read_text().strip()
    try:
        return int(text)
    except ValueError as e:
        raise ValueError(f"{directory}/{CURRENT}: not a version number: {text!r}") from e


def load(directory: str | Path, version: int | None = None) -> CatalogVersion:
    """One published version (the live one by default)."""
    directory = Path(directory)
    version = current_version(directory) if version is None else version
    vdir = _version_dir(directory, version)
    return CatalogVersion(
        version, ItemSIDs.load(vdir / "items.npz"), SIDTrie.load(vdir / "trie.npz")
    )


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The catalog's writer lock (readers never take it): one publish at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def publish(directory: str | Path, items: ItemSIDs, codebook_size: int) -> int:
    """Write ``items`` as the next version, make it live, return its number."""
    directory = Path(directory)
    with _locked(directory):
        return _publish(directory, items, codebook_size)


def update(directory: str | Path, change: Callable[[ItemSIDs], ItemSIDs]) -> tuple[int, ItemSIDs]:
    """Publish ``change(live items)`` as the next version, reading and writing under the
    writer lock, so that two concurrent edits both land instead of one undoing the other.
    Whatever ``change`` raises leaves the catalog as it was."""
    directory = Path(directory)
    with _locked(directory):
        live = load(directory)
        items = change(live.items)
        return _publish(directory, items, live.trie.codebook_size), items


def _publish(directory: Path, items: ItemSIDs, codebook_size: int) -> int:
    if len(items.item_ids) == 0:
        raise ValueError("a catalog needs at least one item")
    if len(np.unique(items.item_ids)) != len(items.item_ids):
        raise ValueError("catalog item ids must be unique")
    try:
        version = current_version(directory) + 1
    except FileNotFoundError:
        version = 1
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    try:
        items.save(staging / "items.npz")
        SIDTrie.from_codes(items.codes, codebook_size).save(staging / "trie.npz")
        staging.rename(_version_dir(directory, version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CURRENT}.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{version}\n")
    os.replace(tmp, directory / CURRENT)
    for old in sorted(directory.glob("v[0-9]*"))[:-KEEP_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("published catalog v%d: %d items in %s", version, len(items.item_ids), directory)
    return version


def with_changes(
    items: ItemSIDs,
    add_ids: Iterable[str] = (),
    add_codes: np.ndarray | None = None,
    remove_ids: Iterable[str] = (),
) -> ItemSIDs:
    """A new item table: ``remove_ids`` dropped, ``add_ids`` (codes from the saved
    tokenizer) appended with zero popularity, collision ranks recomputed."""
    remove = set(remove_ids)
    unknown = remove - set(items.item_ids)
    if unknown:
        raise KeyError(f"not in the catalog: {sorted(unknown)[:5]}")
    add_ids = np.asarray(list(add_ids), dtype=object).astype(str)
    add_codes = np.zeros((0, items.codes.shape[1]), np.int64) if add_codes is None else add_codes
    if len(add_ids) != len(add_codes):
        raise ValueError(f"{len(add_ids)} new ids but {len(add_codes)} SIDs")
    keep = ~np.isin(items.item_ids, list(remove))
    ids = np.concatenate([items.item_ids[keep], add_ids])
    codes = np.concatenate([items.codes[keep], np.asarray(add_codes, np.int64)])
    popularity = np.concatenate([items.popularity[keep], np.zeros(len(add_ids), np.int64)])
    return ItemSIDs(ids, codes, collision_ranks(codes, popularity), popularity)


class TrieWatcher:
    """The live trie of a catalog directory, reloaded when ``CURRENT`` changes.

    ``get`` costs one ``stat`` when nothing changed. A version that fails to load is
    logged and the previous trie stays in service.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._stamp: tuple[int, int] | None = None
        self.version = current_version(self.directory)
        self.trie = SIDTrie.load(_version_dir(self.directory, self.version) / "trie.npz")
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.directory / CURRENT)
        return st.st_mtime_ns, st.st_ino

    def get(self) -> tuple[int, SIDTrie]:
        try:
            stamp = self._stat()
        except OSError as e:
            log.error("catalog unreadable, keeping v%d: %s", self.version, e)
            return self.version, self.trie
        if stamp != self._stamp:
            self._stamp = stamp  # a broken version is tried once, not on every batch
            try:
                version = current_version(self.directory)
                if version != self.version:
                    trie = SIDTrie.load(_version_dir(self.directory, version) / "trie.npz")
                    self.version, self.trie = version, trie
                    log.info("catalog v%d live: %d SIDs", version, len(trie))
            except (OSError, ValueError) as e:
                log.error("catalog reload failed, keeping v%d: %s", self.version, e)
        return self.version, self.trie
