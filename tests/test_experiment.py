"""`onerec build`, `train` and `eval` end to end on a tiny synthetic set."""

from __future__ import annotations

import json

from onerec.cli import main

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
    assert "| oracle |" in (reports / "eval.md").read_text()

    assert main(["export", "--artifacts", str(art)]) == 0
    exported = sorted(p.name for p in (art / "onnx").iterdir())
    assert exported == [*(f"decoder_step_{t}.onnx" for t in range(3)), "encoder.onnx"]
