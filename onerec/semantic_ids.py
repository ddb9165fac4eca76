"""The offline step from a data set to semantic IDs, and the files it leaves behind.

``tokenize_dataset`` fits item embeddings and the RQ-KMeans tokenizer on a data set and
writes, into one directory:

* ``embedder.npz``   -- the :class:`~onerec.embeddings.ItemEmbedder` (content PCA);
* ``item_embeddings.npy`` -- the (N, d) embeddings that were tokenized (the model's frozen
  item vectors);
* ``codebooks.npz``  -- the :class:`~onerec.tokenizer.SemanticTokenizer`;
* ``item_sids.parquet`` -- item_id, sid_0..sid_{L-1}, collision_rank, popularity;
* ``tokenizer.json`` -- cluster sizes, quantisation error and collision statistics.

``tokenize_new_items`` is what a live catalog update calls: saved embedder and codebooks,
no retraining.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from onerec.data.schema import Dataset
from onerec.embeddings import ItemEmbedder, item_embeddings
from onerec.metrics import last_out
from onerec.runtime.catalog import ItemSIDs, collision_ranks
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig, collision_stats


def sids_to_frame(items: ItemSIDs) -> pd.DataFrame:
    """The tokenizer's ``item_sids.parquet`` table: one row per item, a column per level."""
    frame = pd.DataFrame({"item_id": items.item_ids})
    for level in range(items.codes.shape[1]):
        frame[f"sid_{level}"] = items.codes[:, level].astype(np.int32)
    frame["collision_rank"] = items.collision_rank.astype(np.int32)
    frame["popularity"] = items.popularity.astype(np.int64)
    return frame


def sids_from_frame(frame: pd.DataFrame) -> ItemSIDs:
    levels = sorted(c for c in frame.columns if c.startswith("sid_"))
    return ItemSIDs(
        frame["item_id"].astype(str).to_numpy(),
        frame[levels].to_numpy(np.int64),
        frame["collision_rank"].to_numpy(np.int64),
        frame["popularity"].to_numpy(np.int64),
    )


def tokenize_dataset(
    ds: Dataset,
    out: str | Path,
    config: TokenizerConfig | None = None,
    progress: bool = True,
    test_events: int = 1,
) -> dict[str, Any]:
    """Fit embeddings and tokenizer on ``ds``, write the artefacts, return the statistics.

    The collaborative signal and the popularity that ranks collisions leave out each
    user's last ``test_events`` (:func:`onerec.metrics.last_out`): the model and its SIDs
    must not encode the items evaluation asks for. Serving loses that many events per
    user. The statistics record ``test_events``, so that training and evaluation on these
    artefacts hold out the same events.
    """
    cfg = config or TokenizerConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fit = np.ones(len(ds.events), bool)
    fit[last_out(ds, test_events).history_end] = False  # the held-out rows
    users, items = ds.user_index()[fit], ds.item_index()[fit]
    embedder, embeddings = item_embeddings(ds.item_content, users, items, seed=cfg.seed)
    embed_s = time.perf_counter() - started
    tokenizer, codes, stats = SemanticTokenizer.fit(embeddings, cfg, progress=progress)
    popularity = np.bincount(items, minlength=ds.n_items)
    sids = ItemSIDs(
        ds.items["item_id"].astype(str).to_numpy(),
        codes,
        collision_ranks(codes, popularity),
        popularity,
    )

    embedder.save(out / "embedder.npz")
    np.save(out / "item_embeddings.npy", embeddings)
    tokenizer.save(out / "codebooks.npz")
    sids_to_frame(sids).to_parquet(out / "item_sids.parquet", index=False)
    stats.update(collision_stats(codes))
    stats.update(
        {
            "config": asdict(tokenizer.config),
            "test_events": test_events,
            "embedding_dim": embedder.dim,
            "embedding_seconds": round(embed_s, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    (out / "tokenizer.json").write_text(json.dumps(stats, indent=2))
    return stats


def load_tokenizer_stats(directory: str | Path) -> dict[str, Any]:
    """What :func:`tokenize_dataset` recorded: the statistics, the config, ``test_events``."""
    return json.loads((Path(directory) / "tokenizer.json").read_text())


def load_item_sids(directory: str | Path) -> ItemSIDs:
    return sids_from_frame(pd.read_parquet(Path(directory) / "item_sids.parquet"))


def tokenize_new_items(directory: str | Path, content: np.ndarray) -> np.ndarray:
    """(N, L) SIDs for new items from their content vectors, with the saved artefacts."""
    directory = Path(directory)
    embedder = ItemEmbedder.load(directory / "embedder.npz")
    tokenizer = SemanticTokenizer.load(directory / "codebooks.npz")
    return tokenizer.encode(embedder.embed(content))
