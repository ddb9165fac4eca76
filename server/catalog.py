"""SID -> items for the front end, version by version, in step with the decoder's trie.

The decoder says which catalog version constrained its answer; :class:`CatalogReader`
maps the SIDs with that same version (loading it on demand), so a hot reload can never
pair a new trie with an old item table or the reverse. Within a version:

* a SID's items come in collision-rank order (the tokenizer's rule: most popular first);
* seen and excluded items are removed, by model index for the items the model knows and
  by id for the rest, all vectorised over the candidates;
* the rest are ordered by the model's ranking stage
  (:func:`onerec.runtime.ranking.rank_candidates`): an item's score is its SID's
  log-probability plus the user vector's dot product with the item's row of the ranking
  stage's item table (an item the model never saw uses its unknown-item row);
* a SID that maps to no item is counted as illegal (it must never happen: the trie and
  the table come from the same files).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onerec.runtime import catalog
from onerec.runtime.ranking import rank_candidates
from onerec.runtime.sid_index import SIDIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogView:
    version: int
    item_ids: np.ndarray  # (N,) str, the version's rows
    sids: np.ndarray  # (N, L)
    model_idx: np.ndarray  # (N,) the model's item index, -1 for items it never saw
    popularity_order: np.ndarray  # (N,) rows, most popular first
    leaf: np.ndarray  # (N,) the row's SID as a leaf of the trie
    index: SIDIndex
    row_by_id: dict[str, int]
    row_by_model: np.ndarray  # (n_model_items,) row of each model item index, -1 if absent
    tokens: np.ndarray  # (N,) the row's index into ``table``
    table: np.ndarray  # (n_model_items + 2, d) the ranking stage's item table, shared by versions

    @classmethod
    def build(
        cls, version: catalog.CatalogVersion, model_items: dict[str, int], table: np.ndarray
    ) -> CatalogView:
        """Built once per version (off the event loop): every per-request lookup after
        this is an array index or a dict probe, never a scan of the catalog."""
        items = version.items
        index = SIDIndex.build(items.codes, items.collision_rank, version.trie.codebook_size)
        leaf = index.trie.leaf_of(items.codes)
        model_idx = np.array([model_items.get(i, -1) for i in items.item_ids], np.int64)
        order = np.lexsort((np.arange(len(leaf)), -items.popularity))
        row_by_model = np.full(len(model_items), -1, np.int64)
        known = np.flatnonzero(model_idx >= 0)
        row_by_model[model_idx[known]] = known
        row_by_id = {item: row for row, item in enumerate(items.item_ids.tolist())}
        return cls(
            version.version,
            items.item_ids,
            items.codes,
            model_idx,
            order,
            leaf,
            index,
            row_by_id,
            row_by_model,
            np.where(model_idx >= 0, model_idx + 1, len(model_items) + 1),
            table,
        )

    def rows_of(self, item_ids) -> np.ndarray:
        """Rows of the given ids (a few: request exclusions) that this version holds."""
        rows = [self.row_by_id.get(str(i), -1) for i in item_ids]
        return np.array([r for r in rows if r >= 0], np.int64)

    def rows_of_model(self, model_idx: np.ndarray) -> np.ndarray:
        """Rows of the given model item indices that this version holds."""
        idx = model_idx[(model_idx >= 0) & (model_idx < len(self.row_by_model))]
        rows = self.row_by_model[idx]
        return rows[rows >= 0]

    def holds(self, item_ids: np.ndarray) -> np.ndarray:
        """Mask: which of these ids this version holds."""
        return np.array([str(i) in self.row_by_id for i in item_ids], bool)

    def exclusion_sids(self, rows: np.ndarray) -> np.ndarray:
        """SIDs worth excluding in the decoder: those all of whose items are in ``rows``, in
        one vectorised pass (a SID that an allowed item shares stays searchable)."""
        leaves, avoided = np.unique(self.leaf[np.unique(rows)], return_counts=True)
        full = leaves[avoided == self.index.sizes[leaves]]
        return self.index.trie.sids[full]

    def allowed(
        self, rows: np.ndarray, seen_idx: np.ndarray, excluded_ids: np.ndarray
    ) -> np.ndarray:
        """Mask over ``rows``: not seen (by model index) and not excluded (by id)."""
        seen = np.isin(self.model_idx[rows], seen_idx) & (self.model_idx[rows] >= 0)
        return ~seen & ~np.isin(self.item_ids[rows], excluded_ids)

    def candidates(
        self,
        sids: np.ndarray,
        sid_logp: np.ndarray,
        seen_idx: np.ndarray,
        excluded_ids: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(C, L) decoded SIDs with their (C,) log-probabilities -> the allowed items they
        reach (rows, in beam order, collisions in collision-rank order), each with its
        SID's log-probability, and the number of SIDs that map to no item (illegal)."""
        valid = sids[:, 0] >= 0
        leaves, leaf_logp = self.index.trie.leaf_of(sids[valid]), sid_logp[valid]
        legal = leaves >= 0
        rows, source = (a[0] for a in self.index.expand(leaves[legal][None]))
        logp = leaf_logp[legal][source[rows >= 0]]
        rows = rows[rows >= 0]
        keep = self.allowed(rows, seen_idx, excluded_ids)
        return rows[keep], logp[keep], int((~legal).sum())

    def rank(
        self,
        sids: np.ndarray,
        sid_logp: np.ndarray,
        user: np.ndarray,
        seen_idx: np.ndarray,
        excluded_ids: np.ndarray,
        count: int,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`candidates` ordered by the generator's ranking stage with the (d,) user
        vector: (rows, scores) of the best ``count``, and the illegal SIDs' number."""
        if user.shape != self.table.shape[1:]:
            raise ValueError(f"user vector {user.shape}, item table {self.table.shape}")
        rows, logp, illegal = self.candidates(sids, sid_logp, seen_idx, excluded_ids)
        order, scores = rank_candidates(user[None], self.table, self.tokens[rows][None], logp[None])
        return rows[order[0]][:count], scores[0][:count], illegal

    def popular(self, seen_idx: np.ndarray, excluded_ids: np.ndarray, count: int) -> np.ndarray:
        """The ``count`` most popular allowed rows (the fallback answer)."""
        rows = self.popularity_order[: count + len(seen_idx) + len(excluded_ids)]
        return rows[self.allowed(rows, seen_idx, excluded_ids)][:count]


class CatalogReader:
    """Versions of a catalog directory: the live one, and any one the decoder names."""

    def __init__(
        self, directory: str | Path, model_items: dict[str, int], table: np.ndarray, keep: int = 4
    ):
        self.directory = Path(directory)
        self.model_items = model_items
        self.table = table
        self.keep = keep
        self._views: OrderedDict[int, CatalogView] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()  # one build per new version, not one per caller
        self._live: tuple[tuple[int, int, int] | None, int] = (None, -1)  # (stat key, version)

    def live_version(self) -> int:
        """The live version number. ``CURRENT`` is read again only when a stat says it was
        replaced (a publish renames a new file over it), so a request costs one stat."""
        st = os.stat(self.directory / catalog.CURRENT)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        known, version = self._live
        if key != known:
            version = catalog.current_version(self.directory)
            self._live = (key, version)  # one assignment: threads see the pair or the old
        return version

    def cached(self, version: int | None = None) -> CatalogView | None:
        """The named (or live) version if it is already loaded; None if :meth:`get` must
        load it, which takes long enough that the event loop hands it to a thread."""
        return self._cached(self.live_version() if version is None else version)

    def get(self, version: int | None = None) -> CatalogView:
        """The named version, or the live one; loaded once and kept while recent."""
        if version is None:
            version = self.live_version()
        view = self._cached(version)
        if view is not None:
            return view
        with self._build_lock:
            view = self._cached(version)  # built while we waited
            if view is not None:
                return view
            view = CatalogView.build(
                catalog.load(self.directory, version), self.model_items, self.table
            )
            log.info("catalog v%d loaded: %d items", version, len(view.item_ids))
            with self._lock:
                self._views[version] = view
                while len(self._views) > self.keep:
                    self._views.popitem(last=False)
        return view

    def _cached(self, version: int) -> CatalogView | None:
        with self._lock:
            view = self._views.get(version)
            if view is not None:
                self._views.move_to_end(version)
            return view
