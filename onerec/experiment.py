"""Artefact-level steps behind ``onerec train`` and ``onerec eval``.

An artefact directory (``onerec build``) holds ``data/`` and ``tokenizer/``; training adds
``model/checkpoint.pt``. Evaluation runs, in one process and on the same split, the OneRec
model (constrained beam search), popularity, a freshly trained SASRec and, where the data
set carries ground truth, the oracle, and merges them into ``reports/eval.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerec.baselines import PopularityModel, SASRecConfig, sasrec_scores, train_sasrec
from onerec.data.schema import Dataset
from onerec.data.synthetic import oracle_scores
from onerec.evaluate import SIDIndex, evaluate_onerec
from onerec.metrics import Split, evaluate_scorer, leave_last_out
from onerec.model import OneRec, OneRecConfig
from onerec.semantic_ids import load_item_sids
from onerec.tokenizer import SemanticTokenizer
from onerec.train import Catalog, SampleSource, TrainConfig, build_model, model_config, train

log = logging.getLogger(__name__)
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def load_catalog(artifacts: Path) -> tuple[Dataset, Catalog, SIDIndex]:
    ds = Dataset.load(artifacts / "data")
    sids = load_item_sids(artifacts / "tokenizer")
    vectors = np.load(artifacts / "tokenizer" / "item_embeddings.npy")
    catalog = Catalog.build(ds, vectors, sids.codes)
    k = SemanticTokenizer.load(artifacts / "tokenizer" / "codebooks.npz").config.codebook_size
    return ds, catalog, SIDIndex.build(sids.codes, sids.collision_rank, k)


def train_artifacts(
    artifacts: Path, train_cfg: TrainConfig, sizes: dict[str, int], resume: bool = False
) -> dict[str, Any]:
    """Train the model on an artefact directory; the checkpoint lands in ``model/``."""
    ds, catalog, index = load_catalog(artifacts)
    cfg = model_config(ds, catalog, index.trie.codebook_size, **sizes)
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg, catalog)
    source = SampleSource(
        ds,
        catalog,
        cfg,
        train_cfg.samples_per_user,
        train_cfg.seed,
        train_cfg.targets_per_sample,
    )
    result = train(model, source, train_cfg, artifacts / "model" / "checkpoint.pt", resume)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["samples"] = len(source)
    (artifacts / "model" / "train.json").write_text(json.dumps(result, indent=2))
    return result


def load_model(artifacts: Path, catalog: Catalog) -> OneRec:
    state = torch.load(artifacts / "model" / "checkpoint.pt", weights_only=False)
    model = build_model(OneRecConfig(**state["model_config"]), catalog)
    model.load_state_dict(state["model"])
    return model.eval()


def evaluate_artifacts(
    artifacts: Path,
    beam_width: int = 128,
    sasrec_epochs: int = 30,
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """All models on one leave-last-out split: {"onerec": {...}, "sasrec": ..., ...}."""
    ds, catalog, index = load_catalog(artifacts)
    split = leave_last_out(ds)
    rows = np.arange(len(split))
    if max_users is not None and max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    results: dict[str, dict[str, float]] = {}

    started = time.perf_counter()
    results["onerec"] = evaluate_onerec(
        load_model(artifacts, catalog), ds, catalog, index, split, beam_width, rows=rows
    )
    log.info("onerec evaluated in %.1fs", time.perf_counter() - started)

    popularity = PopularityModel.fit(ds, split)
    results["popularity"] = _score_rows(lambda r: popularity.scores(r), split, ds, rows)

    # Fair to SASRec: at least its epochs, and at least the wall time OneRec trained for.
    onerec_seconds = _train_seconds(artifacts)
    sasrec = train_sasrec(
        ds, split, SASRecConfig(n_items=ds.n_items), sasrec_epochs, seed, min_seconds=onerec_seconds
    )
    results["sasrec"] = _score_rows(lambda r: sasrec_scores(sasrec, ds, split, r), split, ds, rows)
    log.info(
        "sasrec: %d epochs in %.0fs (onerec trained %.0fs)",
        len(sasrec.train_losses),
        sasrec.train_seconds,
        onerec_seconds,
    )

    if ds.ground_truth is not None:
        gt = ds.ground_truth
        results["oracle"] = _score_rows(
            lambda r: oracle_scores(gt, split.users[r]), split, ds, rows
        )
    return results


def _train_seconds(artifacts: Path) -> float:
    path = artifacts / "model" / "train.json"
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else 0.0


def _score_rows(
    score_fn: Callable[[np.ndarray], np.ndarray], split: Split, ds: Dataset, rows: np.ndarray
) -> dict[str, float]:
    """``evaluate_scorer`` on the chosen ``rows`` of the split only."""
    return evaluate_scorer(lambda chunk: score_fn(rows[chunk]), split.subset(rows), ds)


def write_eval_report(
    name: str, results: dict[str, dict[str, float]], reports: Path, details: dict[str, Any]
) -> None:
    """Merge one data set's rows into ``eval.json`` (shape fixed by DESIGN.md) and ``eval.md``."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "eval.json"
    report = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    report["datasets"][name] = {"models": results, **details}
    path.write_text(json.dumps(report, indent=2))
    lines = ["# Offline evaluation", "", "Leave-last-out, full ranking, seen items filtered.", ""]
    for ds_name, entry in report["datasets"].items():
        lines += [
            f"## {ds_name}",
            "",
            "| model | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 |",
            "|---|---|---|---|---|",
        ]
        for model, m in entry["models"].items():
            cells = " | ".join(f"{m[k]:.4f}" for k in METRICS)
            lines.append(f"| {model} | {cells} |")
        lines += ["", *(f"- {t}" for t in targets(entry["models"]))]
        extra = {k: v for k, v in entry.items() if k != "models"}
        if extra:
            lines += ["", "```", json.dumps(extra, indent=2), "```"]
        lines.append("")
    (reports / "eval.md").write_text("\n".join(lines))


def targets(models: dict[str, dict[str, float]]) -> list[str]:
    """The quality bar, reached or not: with ground truth (synthetic), Recall@10 at least
    2x popularity's and at least SASRec's; on real data, NDCG@10 at least SASRec's."""
    one, pop, sas = models["onerec"], models["popularity"], models["sasrec"]

    def line(what: str, ours: float, bar: float) -> str:
        verdict = "reached" if ours >= bar else "NOT reached"
        ratio = f"{ours / bar:.2f}x" if bar else "bar is 0"
        return f"{what}: {ours:.4f} vs {bar:.4f}, {verdict} ({ratio})"

    if "oracle" in models:
        return [
            line("Recall@10 >= 2x popularity", one["recall@10"], 2 * pop["recall@10"]),
            line("Recall@10 >= SASRec", one["recall@10"], sas["recall@10"]),
        ]
    return [line("NDCG@10 >= SASRec", one["ndcg@10"], sas["ndcg@10"])]
