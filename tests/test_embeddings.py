"""Item embeddings fuse content with a collaborative signal."""

from __future__ import annotations

import numpy as np

from onerec.embeddings import ItemEmbedder, collaborative_factors, cooccurrence, item_embeddings


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cooccurrence_respects_users_and_window() -> None:
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 3, 0])
    m = cooccurrence(users, items, 4, window=1).toarray()
    assert m[0, 1] == m[1, 0] == 1
    assert m[0, 2] == 0  # two steps apart, window 1
    assert m[2, 3] == 0  # different users
    assert m[3, 0] == 1


def test_co_consumed_items_end_up_close() -> None:
    """Items 0..9 are consumed together by one group of users, 10..19 by another;
    content is pure noise, so only the collaborative part can tell the groups apart."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(200):
        group = u % 2
        seq = rng.integers(0, 10, 40) + 10 * group
        users += [u] * 40
        items += seq.tolist()
    collab = collaborative_factors(np.array(users), np.array(items), 20, dim=4)
    within = np.mean([_cos(collab[i], collab[j]) for i in range(10) for j in range(10) if i != j])
    across = np.mean([_cos(collab[i], collab[j + 10]) for i in range(10) for j in range(10)])
    assert within > across + 0.5

    content = rng.normal(size=(20, 8))
    _, emb = item_embeddings(content, np.array(users), np.array(items), content_dim=4, collab_dim=4)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    assert d[:10, :10].mean() < d[:10, 10:].mean()


def test_new_items_are_embedded_by_content_alone(tmp_path) -> None:
    rng = np.random.default_rng(1)
    content = rng.normal(size=(50, 6))
    embedder = ItemEmbedder.fit(content, content_dim=4, collab_dim=3)
    embedder.save(tmp_path / "e.npz")
    loaded = ItemEmbedder.load(tmp_path / "e.npz")
    new = loaded.embed(content[:5])
    assert new.shape == (5, 7)
    np.testing.assert_array_equal(new[:, 4:], 0.0)
    np.testing.assert_allclose(new, embedder.embed(content[:5]))
