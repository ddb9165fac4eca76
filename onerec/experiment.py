"""Artefact-level steps behind ``onerec train`` and ``onerec eval``.

An artefact directory (``onerec build``) holds ``data/`` and ``tokenizer/``; training adds
``model/checkpoint.pt``. Evaluation runs, in one process and on the same split, the OneRec
model (constrained beam search), popularity, a freshly trained SASRec and, where the data
set carries ground truth, the oracle, and merges them into ``reports/eval.json``. Each
quality bar carries the paired standard error of the per-user difference, because on a few
hundred users a gap of 0.005 in NDCG@10 is within noise and can flip a verdict.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onerec.baselines import PopularityModel, SASRecConfig, sasrec_scores, train_sasrec
from onerec.data.schema import Dataset
from onerec.data.synthetic import oracle_scores
from onerec.evaluate import fit_rank_weight, onerec_ranks
from onerec.metrics import Split, gains, leave_last_out, scorer_ranks
from onerec.model import OneRec
from onerec.runtime.config import OneRecConfig
from onerec.runtime.sid_index import SIDIndex
from onerec.semantic_ids import load_item_sids
from onerec.tokenizer import SemanticTokenizer
from onerec.train import (
    ItemTables,
    SampleSource,
    TrainConfig,
    build_model,
    model_config,
    train,
    train_ranker,
)

log = logging.getLogger(__name__)
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def load_item_tables(artifacts: Path) -> tuple[Dataset, ItemTables, SIDIndex]:
    ds = Dataset.load(artifacts / "data")
    sids = load_item_sids(artifacts / "tokenizer")
    vectors = np.load(artifacts / "tokenizer" / "item_embeddings.npy")
    item_tables = ItemTables.build(ds, vectors, sids.codes)
    k = SemanticTokenizer.load(artifacts / "tokenizer" / "codebooks.npz").config.codebook_size
    return ds, item_tables, SIDIndex.build(sids.codes, sids.collision_rank, k)


def train_artifacts(
    artifacts: Path, train_cfg: TrainConfig, sizes: dict[str, int], resume: bool = False
) -> dict[str, Any]:
    """Train the model on an artefact directory; the checkpoint lands in ``model/``."""
    ds, item_tables, index = load_item_tables(artifacts)
    cfg = model_config(ds, item_tables, index.trie.codebook_size, **sizes)
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg, item_tables)
    source = SampleSource(
        ds,
        item_tables,
        cfg,
        train_cfg.samples_per_user,
        train_cfg.seed,
        train_cfg.targets_per_sample,
        validation=train_cfg.keep_best,
    )
    path = artifacts / "model" / "checkpoint.pt"
    result = train(model, source, train_cfg, path, resume)
    result |= train_ranker(model, source, train_cfg)
    result["seconds"] += result["ranker_seconds"]  # all of it: SASRec gets as much
    if train_cfg.keep_best:  # the validation events were held out of training
        fit = fit_rank_weight(model.eval(), ds, item_tables, index, validation_split(ds))
        result["rank_weight"] = float(model.next_item.rank_weight)
        result["rank_weight_ndcg@10"] = {str(w): round(v, 4) for w, v in fit.items()}
    _store_ranker(path, model)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["samples"] = len(source)
    (artifacts / "model" / "train.json").write_text(json.dumps(result, indent=2))
    return result


def validation_split(ds: Dataset, max_users: int = 512, seed: int = 0) -> Split:
    """Each user's second-to-last event, the one training held out for validation, after
    the history before it; a seeded sample of ``max_users`` users keeps the fit short."""
    last = leave_last_out(ds)
    end = last.history_end - 1
    split = Split(last.users, last.history_start, end, ds.item_index()[end].astype(np.int64))
    if len(split) <= max_users:
        return split
    rows = np.random.default_rng(seed).choice(len(split), max_users, replace=False)
    return split.subset(np.sort(rows))


def _store_ranker(path: Path, model: OneRec) -> None:
    """Write the ranking stage, trained on alone and with its fitted weight, into the
    checkpoint's served and resumable weights alike."""
    state = torch.load(path, weights_only=False)
    head = {f"next_item.{k}": v for k, v in model.next_item.state_dict().items()}
    for weights in (state["model"], state.get("best", {}).get("model")):
        if weights is not None:
            weights.update(head)
    torch.save(state, path)


def load_model(artifacts: Path, item_tables: ItemTables) -> OneRec:
    state = torch.load(artifacts / "model" / "checkpoint.pt", weights_only=False)
    config = state["model_config"]
    if "next_item_window" in config:
        raise ValueError(
            f"{artifacts}/model: a checkpoint from before the ranking stage; train it again"
        )
    model = build_model(OneRecConfig(**config), item_tables)
    weights = state["best"]["model"] if state.get("best") else state["model"]
    # Before the ranking phase the head served the encoder's ID table, with no side
    # information: the same scores.
    weights.setdefault("next_item.items.weight", weights["encoder.item.weight"])
    for name in ("vector", "author", "tag", "codes"):
        side = getattr(model.next_item, name).weight
        weights.setdefault(f"next_item.{name}.weight", torch.zeros_like(side))
    model.load_state_dict(weights)
    return model.eval()


@dataclass(frozen=True)
class Evaluation:
    """Per-user target ranks of every model, and each trained model's training summary: with
    best-epoch selection and time budgets, a table's numbers need to say which weights and
    how much training produced them."""

    ranks: dict[str, np.ndarray]
    training: dict[str, dict[str, Any]]


def evaluate_artifacts(
    artifacts: Path,
    beam_width: int = 128,
    sasrec_epochs: int = 30,
    max_users: int | None = None,
    seed: int = 0,
) -> Evaluation:
    """Every model on one leave-last-out split: per-user target ranks, {"onerec": ranks, ...},
    and how each trained model was trained."""
    ds, item_tables, index = load_item_tables(artifacts)
    split = leave_last_out(ds)
    rows = np.arange(len(split))
    if max_users is not None and max_users < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    ranks: dict[str, np.ndarray] = {}

    started = time.perf_counter()
    ranks["onerec"] = onerec_ranks(
        load_model(artifacts, item_tables), ds, item_tables, index, split, beam_width, rows=rows
    )
    log.info("onerec evaluated in %.1fs", time.perf_counter() - started)

    popularity = PopularityModel.fit(ds, split)
    ranks["popularity"] = _score_rows(lambda r: popularity.scores(r), split, ds, rows)

    # Fair to SASRec: at least its epochs, and at least the wall time OneRec trained for.
    onerec_training = training_summary(artifacts)
    onerec_seconds = float(onerec_training.get("seconds", 0.0))
    sasrec = train_sasrec(
        ds, split, SASRecConfig(n_items=ds.n_items), sasrec_epochs, seed, min_seconds=onerec_seconds
    )
    ranks["sasrec"] = _score_rows(lambda r: sasrec_scores(sasrec, ds, split, r), split, ds, rows)
    sasrec_training = {
        "epochs": len(sasrec.train_losses),
        "seconds": round(sasrec.train_seconds, 1),
    }
    log.info("sasrec: %s (onerec trained %.0fs)", sasrec_training, onerec_seconds)

    if ds.ground_truth is not None:
        gt = ds.ground_truth
        ranks["oracle"] = _score_rows(lambda r: oracle_scores(gt, split.users[r]), split, ds, rows)
    return Evaluation(ranks, {"onerec": onerec_training, "sasrec": sasrec_training})


def training_summary(artifacts: Path) -> dict[str, Any]:
    """What ``onerec train`` recorded (epochs, kept epoch, seconds, ...); {} if untrained."""
    path = artifacts / "model" / "train.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _score_rows(
    score_fn: Callable[[np.ndarray], np.ndarray], split: Split, ds: Dataset, rows: np.ndarray
) -> np.ndarray:
    """``scorer_ranks`` on the chosen ``rows`` of the split only."""
    return scorer_ranks(lambda chunk: score_fn(rows[chunk]), split.subset(rows), ds)


@dataclass(frozen=True)
class TargetCheck:
    """One quality bar: OneRec's metric against ``bar``, with the standard error of the mean
    per-user difference (paired: both models ranked the same users' held-out items)."""

    what: str
    ours: float
    bar: float
    se: float

    def line(self) -> str:
        verdict = "reached" if self.ours >= self.bar else "NOT reached"
        ratio = f"{self.ours / self.bar:.2f}x" if self.bar else "bar is 0"
        diff, margin = self.ours - self.bar, 1.96 * self.se
        noise = ", within noise" if abs(diff) <= margin else ""
        return (
            f"{self.what}: {self.ours:.4f} vs {self.bar:.4f}, {verdict} ({ratio}; "
            f"difference {diff:+.4f} ± {margin:.4f} at 95%{noise})"
        )


def target_checks(ranks: dict[str, np.ndarray]) -> list[TargetCheck]:
    """The quality bar, reached or not: with ground truth (synthetic), Recall@10 at least
    2x popularity's and at least SASRec's; on real data, NDCG@10 at least SASRec's."""

    def check(what: str, metric: str, baseline: str, times: float = 1.0) -> TargetCheck:
        ours = gains(ranks["onerec"], metric)
        bar = times * gains(ranks[baseline], metric)
        diff = ours - bar
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        return TargetCheck(what, float(ours.mean()), float(bar.mean()), se)

    if "oracle" in ranks:
        return [
            check("Recall@10 >= 2x popularity", "recall@10", "popularity", 2.0),
            check("Recall@10 >= SASRec", "recall@10", "sasrec"),
        ]
    return [check("NDCG@10 >= SASRec", "ndcg@10", "sasrec")]


def write_eval_report(
    name: str,
    results: dict[str, dict[str, float]],
    checks: list[TargetCheck],
    reports: Path,
    details: dict[str, Any],
) -> None:
    """Merge one data set's rows into ``eval.json`` (shape fixed by DESIGN.md) and ``eval.md``."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "eval.json"
    report = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    targets = [asdict(c) for c in checks]
    report["datasets"][name] = {"models": results, "targets": targets, **details}
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
        lines += ["", *(f"- {TargetCheck(**c).line()}" for c in entry.get("targets", []))]
        extra = {k: v for k, v in entry.items() if k not in ("models", "targets")}
        if extra:
            lines += ["", "```", json.dumps(extra, indent=2), "```"]
        lines.append("")
    (reports / "eval.md").write_text("\n".join(lines))
