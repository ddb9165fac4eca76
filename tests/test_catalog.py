"""The versioned catalog: concurrent edits, and a broken version that must not stick."""

from __future__ import annotations

import threading
from functools import partial

import numpy as np

from onerec.runtime import catalog
from onerec.runtime.catalog import ItemSIDs, collision_ranks
from server.catalog import CatalogReader


def _items(n: int = 40, k: int = 8) -> ItemSIDs:
    codes = np.random.default_rng(0).integers(0, k, (n, 3))
    popularity = np.arange(n)[::-1].copy()
    ids = np.array([f"i{i}" for i in range(n)])
    return ItemSIDs(ids, codes, collision_ranks(codes, popularity), popularity)


def test_concurrent_edits_all_land(tmp_path) -> None:
    """Each writer reads the live version and publishes its change; none may undo another."""
    catalog.publish(tmp_path, _items(), 8)
    removed = [f"i{i}" for i in range(8)]
    threads = [
        threading.Thread(
            target=catalog.update, args=(tmp_path, partial(catalog.with_changes, remove_ids=[i]))
        )
        for i in removed
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = catalog.load(tmp_path)
    assert live.version == 1 + len(removed)
    assert not set(removed) & set(live.items.item_ids) and len(live.items.item_ids) == 32
    assert live.trie.contains(live.items.codes).all()


def test_a_failed_change_publishes_nothing(tmp_path) -> None:
    catalog.publish(tmp_path, _items(), 8)
    duplicate = partial(catalog.with_changes, add_ids=["i3"], add_codes=np.zeros((1, 3), int))
    try:
        catalog.update(tmp_path, duplicate)
    except ValueError as e:
        assert "unique" in str(e)
    else:
        raise AssertionError("a duplicate id was published")
    assert catalog.current_version(tmp_path) == 1


def test_trie_watcher_keeps_serving_through_a_broken_version(tmp_path, monkeypatch) -> None:
    items = _items()
    catalog.publish(tmp_path, items, 8)
    watcher = catalog.TrieWatcher(tmp_path)
    smaller = catalog.with_changes(items, remove_ids=["i0", "i1"])
    assert catalog.publish(tmp_path, smaller, 8) == 2
    (tmp_path / "v000002" / "trie.npz").write_bytes(b"not a trie")
    loads = []
    real_load = catalog.SIDTrie.load
    monkeypatch.setattr(catalog.SIDTrie, "load", lambda p: loads.append(p) or real_load(p))
    for _ in range(5):  # every batch asks; the broken file is read once, v1 keeps serving
        version, trie = watcher.get()
        assert version == 1 and len(trie) == len(np.unique(items.codes, axis=0))
    assert len(loads) == 1
    assert catalog.publish(tmp_path, smaller, 8) == 3  # a good version replaces it
    assert watcher.get()[0] == 3


def test_the_front_ends_reader_sees_a_publish_at_once(tmp_path) -> None:
    """The reader stats ``CURRENT`` instead of reading it per request; a publish (a new
    file renamed over it) must still be the very next request's live version."""
    items = _items()
    catalog.publish(tmp_path, items, 8)
    reader = CatalogReader(tmp_path, {f"i{i}": i for i in range(40)}, np.zeros((42, 2)))
    assert reader.cached() is None  # nothing loaded yet: the caller loads it off the loop
    first = reader.get()
    assert first.version == 1 and reader.cached() is first
    catalog.publish(tmp_path, catalog.with_changes(items, remove_ids=["i0"]), 8)
    assert reader.live_version() == 2 and reader.cached() is None
    second = reader.get()
    assert second.version == 2 and "i0" not in second.row_by_id
    assert reader.cached() is second and reader.cached(1) is first  # kept while recent
