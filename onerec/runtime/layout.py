"""Where the model repository keeps each Triton model and the catalog: the names the
offline writer (``onerec.repository``), the Triton models and the front end share."""

from __future__ import annotations

from pathlib import Path

# The tracked repository in a source checkout: configs and model.py files, the default
# destination of a build.
TEMPLATE = Path(__file__).resolve().parents[2] / "model_repository"
ENCODER, DECODER, ENSEMBLE = "onerec_encoder", "onerec_decoder", "onerec"
REWARD = "onerec_reward"  # present only when the build trained a reward model
REWARD_ONNX, REWARD_JSON = "reward.onnx", "reward.json"  # in REWARD/1/
CATALOG = "catalog"
MODEL_ITEMS = "items.npz"  # beside encoder.onnx: onerec.runtime.model_items.ModelItems
ITEM_TABLE = "item_table.npy"  # beside encoder.onnx: the ranking stage's item rows
# CPU instances per model, as the tracked configs have them: with one, Triton's dynamic
# batcher could leave a queued request for its 500 ms idle wait while the instance sat
# free (docs/benchmarks.md, "The tail").
DEFAULT_INSTANCES = 2


def catalog_dir(repository: str | Path) -> Path:
    return Path(repository) / DECODER / CATALOG
