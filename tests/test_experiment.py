"""`onerec build`, `train` and `eval` end to end on a tiny synthetic set."""

from __future__ import annotations

import json

from onerec.cli import main
from onerec.experiment import targets

TINY_DATA = ["--users", "40", "--items", "150", "--max-history", "300", "--codebook-size", "8"]
TINY_MODEL = ["--d-model", "32", "--lifelong-len", "50", "--positive-len", "32", "--n-queries", "8"]


def test_build_train_eval_writes_the_report(tmp_path) -> None:
    art = tmp_path / "art"
    assert main(["build", "--out", str(art), "--until", "tokenizer", *TINY_DATA]) == 0
    train = ["train", "--artifacts", str(art), "--epochs", "1", "--threads", "1", *TINY_MODEL]
    assert main(train) == 0
    assert (art / "model" / "checkpoint.pt").is_file()
    assert json.loads((art / "model" / "train.json").read_text())["epochs"] == 1
    reports = tmp_path / "reports"
    evaluate = ["eval", "--artifacts", str(art), "--reports", str(reports), "--name", "tiny"]
    assert main([*evaluate, "--beam-width", "16", "--sasrec-epochs", "1", "--max-users", "12"]) == 0

    report = json.loads((reports / "eval.json").read_text())
    models = report["datasets"]["tiny"]["models"]
    assert set(models) == {"onerec", "popularity", "sasrec", "oracle"}
    for metrics in models.values():
        assert set(metrics) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    md = (reports / "eval.md").read_text()
    assert "| oracle |" in md and "Recall@10 >= 2x popularity" in md

    assert main(["export", "--artifacts", str(art)]) == 0
    exported = sorted(p.name for p in (art / "onnx").iterdir())
    assert exported == [*(f"decoder_step_{t}.onnx" for t in range(3)), "encoder.onnx"]


def test_targets_say_reached_or_not() -> None:
    row = {"recall@10": 0.0, "ndcg@10": 0.0, "recall@50": 0.0, "ndcg@50": 0.0}
    models = {
        "onerec": row | {"recall@10": 0.07, "ndcg@10": 0.03},
        "popularity": row | {"recall@10": 0.04},
        "sasrec": row | {"recall@10": 0.05, "ndcg@10": 0.04},
    }
    real = targets(models)
    assert real == ["NDCG@10 >= SASRec: 0.0300 vs 0.0400, NOT reached (0.75x)"]
    synthetic = targets(models | {"oracle": row})
    assert synthetic[0].startswith("Recall@10 >= 2x popularity: 0.0700 vs 0.0800, NOT reached")
    assert synthetic[1] == "Recall@10 >= SASRec: 0.0700 vs 0.0500, reached (1.40x)"
