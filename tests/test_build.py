"""The offline build that `make run` performs, on a tiny synthetic set."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

from onerec.align_eval import BLEND_FILE, BLENDS
from onerec.cli import main
from onerec.cli.common import serving_pathways
from onerec.data.schema import Dataset
from onerec.experiment import load_item_tables, load_model, load_served_model
from onerec.export import parity
from onerec.runtime import catalog
from onerec.runtime.layout import DECODER, ENCODER, REWARD, REWARD_JSON, REWARD_ONNX
from onerec.runtime.onnx_runners import OnnxOneRec
from onerec.runtime.reward import RewardMeta
from onerec.semantic_ids import load_item_sids, sids_to_frame, tokenize_new_items
from server.feature_store import stored_users

TINY = ["--users", "60", "--items", "400", "--max-history", "1500", "--codebook-size", "16"]


def test_build_writes_data_and_semantic_ids(tmp_path, capsys) -> None:
    out = tmp_path / "art"
    assert main(["build", "--out", str(out), "--until", "tokenizer", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "collision rate" in printed and "build done" in printed

    ds = Dataset.load(out / "data")
    sids = load_item_sids(out / "tokenizer")
    assert list(sids.item_ids) == ds.items["item_id"].tolist()
    assert sids.codes.shape == (400, 3) and sids.codes.max() < 16
    # Every full SID has exactly one primary item (collision rank 0).
    frame = sids_to_frame(sids)
    primaries = frame[frame.collision_rank == 0]
    assert len(primaries) == len(frame.drop_duplicates(["sid_0", "sid_1", "sid_2"]))
    stats = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert all(lv["cluster_max"] <= lv["capacity"] for lv in stats["levels"])
    assert np.load(out / "tokenizer" / "item_embeddings.npy").shape[0] == 400

    # A second run reuses what is there instead of rebuilding.
    before = (out / "tokenizer" / "item_sids.parquet").stat().st_mtime_ns
    assert main(["build", "--out", str(out), "--until", "tokenizer", *TINY]) == 0
    assert (out / "tokenizer" / "item_sids.parquet").stat().st_mtime_ns == before
    assert "reusing" in capsys.readouterr().out

    # New items get SIDs from the saved embedder and codebooks alone.
    new = tokenize_new_items(out / "tokenizer", ds.item_content[:7] + 0.01)
    assert new.shape == (7, 3) and (new >= 0).all() and (new < 16).all()


def test_bad_source_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().out


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "onerec", "--help"], capture_output=True, text=True, check=True
    )
    assert "build" in result.stdout and "tokenize" in result.stdout


def test_item_sids_round_trip(tmp_path) -> None:
    frame = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "sid_0": [1, 1],
            "sid_1": [2, 2],
            "sid_2": [3, 3],
            "collision_rank": [0, 1],
            "popularity": [5, 2],
        }
    )
    frame.to_parquet(tmp_path / "item_sids.parquet")
    sids = load_item_sids(tmp_path)
    np.testing.assert_array_equal(sids.codes, [[1, 2, 3], [1, 2, 3]])
    pd.testing.assert_frame_equal(sids_to_frame(sids), frame, check_dtype=False)


def test_full_build_fills_a_model_repository(tmp_path) -> None:
    """`make run`'s build: train (cut short here by --minutes) and write the repository."""
    out, repo = tmp_path / "art", tmp_path / "repo"
    small = ["--users", "30", "--items", "120", "--max-history", "200", "--codebook-size", "8"]
    build = ["build", "--out", str(out), "--repository", str(repo), "--minutes", "0.05"]
    build += ["--ranker-minutes", "0.01", "--reward-minutes", "0.02", "--align-steps", "2"]
    assert main([*build, "--decoder-instances", "3", *small]) == 0
    assert (out / "model" / "checkpoint.pt").is_file()
    # A short ECPO stage against the reward model: its generator is the one exported.
    aligned = json.loads((out / "model" / "aligned_ecpo.json").read_text())
    assert aligned["config"]["method"] == "ecpo" and aligned["steps"] == 2
    assert json.loads((out / "model" / "served.json").read_text()) == {
        "generator": "aligned_ecpo.pt"
    }
    exported = OnnxOneRec(repo / ENCODER / "1", decoder_directory=repo / DECODER / "1")
    _, tables, index = load_item_tables(out)
    aligned_model = load_served_model(out, tables)
    pathways = serving_pathways(out, aligned_model.cfg, 4, seed=0)
    p = parity(aligned_model, exported, pathways, index.trie, beam_width=16)
    assert p.top10_equal == 4 and max(p.kv_max_abs, p.step_max_abs) <= 1e-4
    trained = load_model(out, tables)  # the pre-RL generator is not what was exported
    before, after = trained.state_dict(), aligned_model.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # The reward model, with the blend fitted for that generator, beside the decoder.
    meta = RewardMeta.load(repo / REWARD / "1" / REWARD_JSON)
    record = json.loads((out / "model" / BLEND_FILE).read_text())
    assert record["generator"] == "aligned_ecpo.pt"
    assert meta.blend == record["blend"] in BLENDS and meta.n_items == 120
    assert (repo / REWARD / "1" / REWARD_ONNX).is_file()
    assert (repo / "onerec_encoder" / "1" / "encoder.onnx").is_file()
    steps = sorted(p.name for p in (repo / "onerec_decoder" / "1").glob("decoder_step_*.onnx"))
    assert steps == [f"decoder_step_{t}.onnx" for t in range(3)]
    assert (repo / "onerec" / "config.pbtxt").is_file() and (repo / "onerec" / "1").is_dir()
    assert "count: 3 kind: KIND_CPU" in (repo / "onerec_decoder" / "config.pbtxt").read_text()
    # Two by default: one instance let Triton's batcher stall (docs/benchmarks.md).
    assert "count: 2 kind: KIND_CPU" in (repo / "onerec_encoder" / "config.pbtxt").read_text()
    catalog_dir = repo / "onerec_decoder" / "catalog"
    assert (catalog_dir / "CURRENT").read_text().strip() == "1"
    (out / "features.sqlite").write_bytes(b"")  # a stray empty file is rebuilt, not served
    assert main([*build, *small]) == 0  # a rebuild publishes the next catalog version
    assert (catalog_dir / "CURRENT").read_text().strip() == "2"
    assert stored_users(out / "features.sqlite") == 30
    bare = tmp_path / "bare"  # no reward model: no directory Triton would fail to load
    assert main([*build, "--repository", str(bare), "--reward-minutes", "0", *small]) == 0
    assert (bare / "onerec_decoder" / "1" / "decoder_step_0.onnx").is_file()
    assert not (bare / REWARD).exists()
    served = json.loads((out / "model" / "served.json").read_text())
    assert served == {"generator": "checkpoint.pt"}  # nothing to align against
    chosen = tmp_path / "chosen"  # an operator's blend instead of the fitted one
    assert main([*build, "--repository", str(chosen), "--reward-blend", "0.7", *small]) == 0
    assert RewardMeta.load(chosen / REWARD / "1" / REWARD_JSON).blend == 0.7

    # Catalog changes publish new versions; a removed item leaves the live table.
    live = catalog.load(catalog_dir)
    gone = str(live.items.item_ids[0])
    assert main(["catalog", "remove", gone, "--repository", str(repo)]) == 0
    content = tmp_path / "new.npy"
    np.save(content, Dataset.load(out / "data").item_content[:2] + 0.01)
    add = ["catalog", "add", "n1", "n2", "--content", str(content)]
    assert main([*add, "--tokenizer", str(out / "tokenizer"), "--repository", str(repo)]) == 0
    latest = catalog.load(catalog_dir)
    assert latest.version == 4 and gone not in set(latest.items.item_ids)
    assert {"n1", "n2"} <= set(latest.items.item_ids)
    assert latest.trie.contains(latest.items.codes).all()
    assert main(["catalog", "remove", "no-such-item", "--repository", str(repo)]) == 2


def test_semantic_ids_never_see_the_held_out_events(tmp_path) -> None:
    """The embeddings and collision popularity must not encode the items that evaluation
    holds out: rewriting every user's last event leaves the tokenizer's output unchanged,
    while rewriting any earlier event does change it."""
    from dataclasses import replace

    from onerec.data.synthetic import SyntheticConfig, generate
    from onerec.metrics import leave_last_out
    from onerec.semantic_ids import tokenize_dataset
    from onerec.tokenizer import TokenizerConfig

    ds = generate(SyntheticConfig(n_users=40, n_items=300, max_history=400))
    cfg = TokenizerConfig(codebook_size=8)

    def tokenized(rows: np.ndarray, name: str) -> np.ndarray:
        codes = ds.item_index().copy()
        codes[rows] = (codes[rows] + 1) % ds.n_items
        events = ds.events.copy()
        events["item_id"] = pd.Categorical.from_codes(codes, ds.events["item_id"].cat.categories)
        tokenize_dataset(replace(ds, events=events), tmp_path / name, cfg, progress=False)
        sids = load_item_sids(tmp_path / name)
        embeddings = np.load(tmp_path / name / "item_embeddings.npy")
        return np.concatenate([embeddings.ravel(), sids.codes.ravel(), sids.popularity])

    held_out = leave_last_out(ds).history_end
    base = tokenized(held_out[:0], "base")
    np.testing.assert_array_equal(tokenized(held_out, "held_out"), base)
    assert not np.array_equal(tokenized(held_out - 1, "history"), base)
