"""`onerec build`, `train` and `eval` end to end on a tiny synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onerec.cli import main
from onerec.experiment import target_checks
from onerec.metrics import MISS

TINY_DATA = ["--users", "40", "--items", "150", "--max-history", "300", "--codebook-size", "8"]
TINY_MODEL = ["--d-model", "32", "--lifelong-len", "50", "--positive-len", "32", "--n-queries", "8"]


def test_build_train_eval_writes_the_report(tmp_path) -> None:
    art = tmp_path / "art"
    build = ["build", "--out", str(art), "--until", "tokenizer", "--test-events", "3"]
    assert main([*build, *TINY_DATA]) == 0
    with pytest.raises(SystemExit, match="--force"):  # the SIDs left out 3 events, not 1
        main(["build", "--out", str(art), "--until", "tokenizer", *TINY_DATA])
    train = ["train", "--artifacts", str(art), "--epochs", "1", "--threads", "1", *TINY_MODEL]
    train += ["--ranker-minutes", "0.01"]
    assert main(train) == 0
    assert (art / "model" / "checkpoint.pt").is_file()
    trained = json.loads((art / "model" / "train.json").read_text())
    assert trained["epochs"] == 1 and trained["test_events"] == 3
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
    assert "| oracle |" in md and "Recall@10 >= 2x popularity" in md and " at 95%" in md
    assert "Each user's last 3 events" in md and "candidate recall" in md
    last = report["datasets"]["tiny"]["last_3"]
    assert set(last["models"]) == set(models)
    assert [c["what"] for c in last["targets"]] == [
        c["what"] for c in report["datasets"]["tiny"]["targets"]
    ]
    stages = report["datasets"]["tiny"]["stages"]
    beams, served, wide = stages["beam 16 x1"], stages["beam 16 x4"], stages["beam 64 x1"]
    # The served search keeps the beams' SIDs and adds the next completions: more items.
    assert 0.0 <= beams["candidate_recall"] <= served["candidate_recall"] <= 1.0
    assert beams["candidates"] <= served["candidates"]
    for stage in (beams, served, wide):
        for order in ("sid_order", "head_only", "served"):
            assert stage[order]["recall@50"] <= stage["candidate_recall"]
    sizes = {round(s["candidates"]) for s in (beams, served, wide)}
    assert set(stages["sasrec"]) == {f"recall@{k}" for k in sizes}
    training = report["datasets"]["tiny"]["training"]  # which weights the numbers are from
    assert training["onerec"]["epochs"] == 1 and training["onerec"]["best_epoch"] == 1
    assert training["onerec"]["ranker_epochs"] >= 1  # then the ranking stage alone
    assert training["sasrec"]["epochs"] >= 1 and training["sasrec"]["seconds"] > 0
    choices = report["datasets"]["tiny"]["choices"]  # all that differs between data sets
    assert choices["items"] == 150 and choices["codebook_size"] == 8
    assert choices["rank_weight"] == training["onerec"]["rank_weight"]
    assert f"ranking weight {choices['rank_weight']} (fitted on validation events)" in md

    assert main(["export", "--artifacts", str(art)]) == 0
    exported = sorted(p.name for p in (art / "onnx").iterdir())
    assert exported == [
        *(f"decoder_step_{t}.onnx" for t in range(3)),
        "encoder.onnx",
        "item_table.npy",
    ]


def hits(n_users: int, n_hits: int, rank: int = 0) -> np.ndarray:
    """Ranks of ``n_users`` targets: the first ``n_hits`` at ``rank``, the rest missed."""
    return np.where(np.arange(n_users) < n_hits, rank, MISS)


def test_targets_say_reached_or_not_and_whether_within_noise() -> None:
    ranks = {"onerec": hits(100, 7), "popularity": hits(100, 4), "sasrec": hits(100, 5)}
    real = target_checks(ranks)
    assert [c.what for c in real] == [
        "NDCG@10 >= 1.1x SASRec",
        "NDCG@10 >= SASRec",
        "Recall@50 >= SASRec",
    ]
    assert real[0].line().startswith("NDCG@10 >= 1.1x SASRec: 0.0700 vs 0.0550, reached (1.27x;")
    assert real[1].line().startswith("NDCG@10 >= SASRec: 0.0700 vs 0.0500, reached (1.40x;")
    synthetic = [c.line() for c in target_checks(ranks | {"oracle": hits(100, 100)})]
    assert synthetic[0].startswith("Recall@10 >= 2x popularity: 0.0700 vs 0.0800, NOT reached")
    # Users 5 and 6 alone differ: mean 0.02, sd 0.1407 over 100 users -> 1.96 SE = 0.0276.
    assert synthetic[1] == (
        "Recall@10 >= SASRec: 0.0700 vs 0.0500, reached (1.40x; "
        "difference +0.0200 ± 0.0276 at 95%, within noise)"
    )


def test_the_standard_error_is_paired_over_users() -> None:
    # SASRec hits a subset of OneRec's users: unpaired, 0.25 vs 0.20 on 400 users would be
    # within noise (1.96 SE = 0.058); paired, only the 20 users that differ count.
    ranks = {"onerec": hits(400, 100), "popularity": hits(400, 10), "sasrec": hits(400, 80)}
    check = target_checks(ranks)[1]
    assert check.ours - check.bar == pytest.approx(0.05)  # NDCG@10 of a rank-0 hit is 1
    assert 1.96 * check.se == pytest.approx(0.0214, abs=1e-4)
    assert not check.line().endswith("within noise)")


def test_several_events_per_user_keep_the_standard_error_over_users() -> None:
    """Ranks of shape (users, n): a user's gain is the mean of their n events, so five
    copies of each event give the same error as one, not one sqrt(5) smaller."""
    ranks = {"onerec": hits(400, 100), "popularity": hits(400, 10), "sasrec": hits(400, 80)}
    once = target_checks(ranks)[1]
    repeated = target_checks({k: np.repeat(v[:, None], 5, axis=1) for k, v in ranks.items()})[1]
    assert repeated.ours == pytest.approx(once.ours) and repeated.se == pytest.approx(once.se)
    mixed = {k: np.stack([v, np.roll(v, 7)], axis=1) for k, v in ranks.items()}
    assert target_checks(mixed)[1].se < once.se  # a second, different event per user helps
