"""Fill a Triton model repository with a trained model: the last step of ``onerec build``.

The tracked ``model_repository/`` holds only configs and ``model.py`` files. This writes
the built artefacts beside them (all git-ignored)::

    onerec_encoder/1/encoder.onnx, model.json, item_table.npy, items.npz (the last two
                     are the front end's: the ranking stage's rows and the model's items)
    onerec_decoder/1/decoder_step_{0,1,2}.onnx, model.json
    onerec_decoder/catalog/          versioned SID catalog (onerec.runtime.catalog)
    onerec_reward/1/reward.onnx, reward.json (where the build trained a reward model)

Writing into another directory first copies the tracked files there, which is how tests
and Kubernetes images get a repository of their own.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from onerec.export import export
from onerec.model import OneRec
from onerec.reward import RewardModel
from onerec.runtime import catalog
from onerec.runtime.catalog import ItemSIDs
from onerec.runtime.layout import (
    DECODER,
    DEFAULT_INSTANCES,
    ENCODER,
    ENSEMBLE,
    ITEM_TABLE,
    MODEL_ITEMS,
    REWARD,
    REWARD_JSON,
    REWARD_ONNX,
    TEMPLATE,
    catalog_dir,
)
from onerec.runtime.model_items import ModelItems


def _copy_template(dest: Path, reward: bool) -> None:
    """The tracked configs and model.py files; the reward model's only with a reward model,
    so that a Triton loading every model in ``dest`` (as in Kubernetes) finds none that
    cannot load. (The tracked repository keeps its reward model's directory: the local
    launcher loads it only where ``reward.onnx`` exists.)"""
    if not reward:
        shutil.rmtree(dest / REWARD, ignore_errors=True)
    for model in (ENCODER, DECODER, ENSEMBLE, REWARD) if reward else (ENCODER, DECODER, ENSEMBLE):
        (dest / model / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(TEMPLATE / model / "config.pbtxt", dest / model / "config.pbtxt")
        source = TEMPLATE / model / "1" / "model.py"
        if source.is_file():
            shutil.copy2(source, dest / model / "1" / "model.py")


def set_instances(repository: str | Path, model: str, count: int) -> None:
    """Rewrite the CPU instance count of ``model``'s config."""
    if count < 1:
        raise ValueError(f"instance count must be >= 1, got {count}")
    path = Path(repository) / model / "config.pbtxt"
    text, n = re.subn(
        r"instance_group \[ \{ count: \d+ kind: KIND_CPU \} \]",
        f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]",
        path.read_text(),
    )
    if n != 1:
        raise ValueError(f"{path}: no single CPU instance_group to rewrite")
    path.write_text(text)


def model_items(artifacts: str | Path) -> ModelItems:
    """The model's items from a build's data set and tokenizer, for the front end."""
    import pandas as pd

    frame = pd.read_parquet(Path(artifacts) / "data" / "items.parquet")
    return ModelItems(
        frame["item_id"].astype(str).to_numpy(),
        frame["duration_ms"].to_numpy(np.int64),
        np.load(Path(artifacts) / "tokenizer" / "item_embeddings.npy"),
    )


def write_model_repository(
    model: OneRec,
    items: ItemSIDs,
    served_items: ModelItems,
    dest: str | Path = TEMPLATE,
    encoder_instances: int = DEFAULT_INSTANCES,
    decoder_instances: int = DEFAULT_INSTANCES,
    reward: RewardModel | None = None,
    blend: float = 0.0,
) -> int:
    """Export ``model`` into ``dest``, write ``served_items`` beside the encoder, export
    ``reward`` (or remove a stale one: a model without a reward model must not be served
    beside an old one), and publish ``items`` as the next catalog version.

    Returns the catalog version. Safe to run again on the same repository while Triton is
    stopped; a running Triton picks up only catalog changes (see onerec.runtime.catalog).
    """
    dest = Path(dest).resolve()
    if dest != TEMPLATE:
        _copy_template(dest, reward is not None)
    config = json.dumps(asdict(model.cfg), indent=2)
    with tempfile.TemporaryDirectory() as tmp:
        export(model, tmp)
        enc, dec = dest / ENCODER / "1", dest / DECODER / "1"
        for name in ("encoder.onnx", ITEM_TABLE):
            shutil.move(Path(tmp) / name, enc / name)
        if len(served_items.item_ids) != model.cfg.n_items:
            raise ValueError(
                f"{len(served_items.item_ids)} items for a model of {model.cfg.n_items}"
            )
        served_items.save(enc / MODEL_ITEMS)
        for level in range(model.cfg.sid_levels):
            name = f"decoder_step_{level}.onnx"
            shutil.move(Path(tmp) / name, dec / name)
    for version_dir in (enc, dec):
        (version_dir / "model.json").write_text(config)
    write_reward(dest, reward, blend)
    set_instances(dest, ENCODER, encoder_instances)
    set_instances(dest, DECODER, decoder_instances)
    return catalog.publish(catalog_dir(dest), items, model.cfg.codebook_size)


def write_reward(dest: Path, reward: RewardModel | None, blend: float) -> None:
    """``reward.onnx`` and ``reward.json`` into ``dest``'s reward model, or neither."""
    from onerec.reward import export_reward, reward_meta

    version_dir = dest / REWARD / "1"
    if reward is None:
        for name in (REWARD_ONNX, REWARD_JSON):
            (version_dir / name).unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        export_reward(reward, Path(tmp) / REWARD_ONNX)
        shutil.move(Path(tmp) / REWARD_ONNX, version_dir / REWARD_ONNX)
    reward_meta(reward, blend).save(version_dir / REWARD_JSON)
