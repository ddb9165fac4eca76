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
from onerec.evaluate import beam_ranks, fit_rank_weight, served_ranking
from onerec.metrics import Split, gains, last_out, metrics_from_ranks, scorer_ranks
from onerec.model import OneRec
from onerec.runtime.config import OneRecConfig
from onerec.runtime.ranking import FINAL_EXPAND
from onerec.runtime.sid_index import SIDIndex
from onerec.semantic_ids import load_item_sids, load_tokenizer_stats
from onerec.stage_analysis import HEAD_ONLY, beam_stages, recall_at, stage_lines
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
CHECKPOINT = "checkpoint.pt"  # in model/: the trained generator, best epoch's weights kept
SERVED_FILE = "served.json"  # in model/: which checkpoint the build exported


def load_item_tables(artifacts: Path) -> tuple[Dataset, ItemTables, SIDIndex]:
    ds = Dataset.load(artifacts / "data")
    sids = load_item_sids(artifacts / "tokenizer")
    vectors = np.load(artifacts / "tokenizer" / "item_embeddings.npy")
    item_tables = ItemTables.build(ds, vectors, sids.codes)
    k = SemanticTokenizer.load(artifacts / "tokenizer" / "codebooks.npz").config.codebook_size
    return ds, item_tables, SIDIndex.build(sids.codes, sids.collision_rank, k)


def test_events(artifacts: Path) -> int:
    """How many of each user's last events the artefacts hold out for evaluation (``onerec
    build --test-events``): the SIDs, training and evaluation must agree on them."""
    stats = load_tokenizer_stats(artifacts / "tokenizer")
    return int(stats.get("test_events", 1))


def per_dataset_choices(artifacts: Path) -> dict[str, Any]:
    """What differs between data sets under ``make eval``'s one set of flags: the codebook
    size, a rule of the catalog's size, and the ranking weight, fitted on validation events.
    The report lists them so that a reader can see nothing else was set by hand."""
    stats = load_tokenizer_stats(artifacts / "tokenizer")
    choices: dict[str, Any] = {
        "items": stats["items"],
        "codebook_size": stats["config"]["codebook_size"],
    }
    if "rank_weight" in (training := training_summary(artifacts)):
        choices["rank_weight"] = training["rank_weight"]
    return choices


def train_artifacts(
    artifacts: Path, train_cfg: TrainConfig, sizes: dict[str, int], resume: bool = False
) -> dict[str, Any]:
    """Train the model on an artefact directory; the checkpoint lands in ``model/``."""
    ds, item_tables, index = load_item_tables(artifacts)
    held = test_events(artifacts)
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
        test_events=held,
    )
    path = artifacts / "model" / CHECKPOINT
    result = train(model, source, train_cfg, path, resume)
    result |= train_ranker(model, source, train_cfg)
    result["seconds"] += result["ranker_seconds"]  # all of it: SASRec gets as much
    if train_cfg.keep_best:  # the validation events were held out of training
        validation = validation_split(ds, held)
        fit = fit_rank_weight(model.eval(), ds, item_tables, index, validation)
        result["rank_weight"] = float(model.next_item.rank_weight)
        result["rank_weight_ndcg@10"] = {str(w): round(v, 4) for w, v in fit.items()}
    _store_ranker(path, model)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["samples"] = len(source)
    result["test_events"] = held
    (artifacts / "model" / "train.json").write_text(json.dumps(result, indent=2))
    return result


def validation_split(
    ds: Dataset, test_events: int = 1, max_users: int = 512, seed: int = 0
) -> Split:
    """Each user's event before the ``test_events`` held-out ones, the one training held out
    for validation, after the history before it; a seeded sample of ``max_users`` users
    keeps the fit short."""
    last = last_out(ds, 1, min_events=2 + test_events)
    end = last.history_end - test_events
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


def load_checkpoint(path: Path, item_tables: ItemTables) -> OneRec:
    """A generator from a checkpoint with ``model`` and ``model_config`` (checkpoint.pt,
    whose best epoch's weights win where training kept them, or an aligned one), ready
    for eval or ONNX export."""
    state = torch.load(path, weights_only=False)
    model = build_model(OneRecConfig(**state["model_config"]), item_tables)
    weights = state["best"]["model"] if state.get("best") else state["model"]
    model.load_state_dict(weights)
    return model.eval()


def load_model(artifacts: Path, item_tables: ItemTables, checkpoint: str = CHECKPOINT) -> OneRec:
    """The generator in ``model/<checkpoint>``: the trained one by default."""
    return load_checkpoint(artifacts / "model" / checkpoint, item_tables)


def load_served_model(artifacts: Path, item_tables: ItemTables) -> OneRec:
    """The generator that ``onerec build`` exported (``model/served.json`` names it;
    checkpoint.pt before any build did): what a baseline loads to run the served weights."""
    record = artifacts / "model" / SERVED_FILE
    checkpoint = json.loads(record.read_text())["generator"] if record.is_file() else CHECKPOINT
    return load_model(artifacts, item_tables, checkpoint)


@dataclass(frozen=True)
class Evaluation:
    """Per-user target ranks of every model, each trained model's training summary (with
    best-epoch selection and time budgets, a table's numbers need to say which weights and
    how much training produced them), and where OneRec loses quality
    (:mod:`onerec.stage_analysis`)."""

    last_n: dict[str, np.ndarray]  # (users, n): ranks of each user's last n held-out events
    training: dict[str, dict[str, Any]]
    stages: dict[str, Any]

    @property
    def ranks(self) -> dict[str, np.ndarray]:
        """The leave-last-out headline: each user's last event."""
        return {name: r[:, -1] for name, r in self.last_n.items()}

    @property
    def test_events(self) -> int:
        return next(iter(self.last_n.values())).shape[1]


def evaluate_artifacts(
    artifacts: Path,
    beam_width: int = 128,
    sasrec_epochs: int = 30,
    max_users: int | None = None,
    seed: int = 0,
) -> Evaluation:
    """Every model on the same held-out events: each user's last ``n`` (``onerec build
    --test-events``), each scored against the history up to it, after one training on the
    events before all of them. The last of them is the leave-last-out headline."""
    ds, item_tables, index = load_item_tables(artifacts)
    n = test_events(artifacts)
    split = last_out(ds, n)
    users = np.arange(len(split) // n)
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    rows = (users[:, None] * n + np.arange(n)).ravel()
    ranks: dict[str, np.ndarray] = {}

    started = time.perf_counter()
    model = load_model(artifacts, item_tables)
    served = served_ranking(model)[1]
    stages = {}
    weights = (0.0, served, HEAD_ONLY)
    for width, expand in ((beam_width, 1), (beam_width, FINAL_EXPAND), (4 * beam_width, 1)):
        found, counts = beam_ranks(
            model, ds, item_tables, index, split, rows, width, weights, expand
        )
        stages[f"beam {width} x{expand}"] = beam_stages(found, counts, served)
        if (width, expand) == (beam_width, FINAL_EXPAND):  # as served
            ranks["onerec"] = found[served]
    log.info("onerec evaluated in %.1fs", time.perf_counter() - started)

    popularity = PopularityModel.fit(ds, split)
    ranks["popularity"] = _score_rows(lambda r: popularity.scores(r), split, ds, rows)

    # Fair to SASRec: the same training events, at least its epochs, and at least the wall
    # time OneRec trained for.
    onerec_training = training_summary(artifacts)
    onerec_seconds = float(onerec_training.get("seconds", 0.0))
    sasrec = train_sasrec(
        ds,
        split.subset(np.arange(0, len(split), n)),  # histories up to the first held-out event
        SASRecConfig(n_items=ds.n_items),
        sasrec_epochs,
        seed,
        min_seconds=onerec_seconds,
    )
    ranks["sasrec"] = _score_rows(lambda r: sasrec_scores(sasrec, ds, split, r), split, ds, rows)
    sasrec_training = {
        "epochs": len(sasrec.train_losses),
        "seconds": round(sasrec.train_seconds, 1),
    }
    log.info("sasrec: %s (onerec trained %.0fs)", sasrec_training, onerec_seconds)
    sizes = [round(s["candidates"]) for s in stages.values()]
    stages["sasrec"] = recall_at(ranks["sasrec"], sizes)

    if ds.ground_truth is not None:
        gt = ds.ground_truth
        ranks["oracle"] = _score_rows(lambda r: oracle_scores(gt, split.users[r]), split, ds, rows)
    last_n = {name: r.reshape(len(users), n) for name, r in ranks.items()}
    return Evaluation(last_n, {"onerec": onerec_training, "sasrec": sasrec_training}, stages)


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
    2x popularity's and at least SASRec's; on real data, NDCG@10 at least 1.1x SASRec's
    (and whether it beats SASRec's beyond noise) and Recall@50 at least SASRec's.

    Ranks of shape (users, n) hold n held-out events per user: a user's gain is the mean
    of theirs, so the standard error stays over users, the unit that was sampled.
    """

    def per_user(name: str, metric: str) -> np.ndarray:
        g = gains(ranks[name], metric)
        return g.mean(axis=1) if g.ndim == 2 else g

    def check(what: str, metric: str, baseline: str, times: float = 1.0) -> TargetCheck:
        ours = per_user("onerec", metric)
        bar = times * per_user(baseline, metric)
        diff = ours - bar
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        return TargetCheck(what, float(ours.mean()), float(bar.mean()), se)

    if "oracle" in ranks:
        return [
            check("Recall@10 >= 2x popularity", "recall@10", "popularity", 2.0),
            check("Recall@10 >= SASRec", "recall@10", "sasrec"),
        ]
    return [
        check("NDCG@10 >= 1.1x SASRec", "ndcg@10", "sasrec", 1.1),
        check("NDCG@10 >= SASRec", "ndcg@10", "sasrec"),
        check("Recall@50 >= SASRec", "recall@50", "sasrec"),
    ]


def quality_entry(evaluation: Evaluation) -> dict[str, Any]:
    """A data set's section of ``eval.json``: the headline's metrics and targets (the shape
    DESIGN.md fixes), the last-n row's when n > 1, and the stage analysis."""
    n = evaluation.test_events

    def section(ranks: dict[str, np.ndarray]) -> dict[str, Any]:
        models = {name: metrics_from_ranks(r.ravel()) for name, r in ranks.items()}
        return {"models": models, "targets": [asdict(c) for c in target_checks(ranks)]}

    entry = section(evaluation.ranks)
    if n > 1:
        entry[f"last_{n}"] = section(evaluation.last_n)
    return entry | {"stages": evaluation.stages, "training": evaluation.training}


def write_eval_report(name: str, entry: dict[str, Any], reports: Path) -> None:
    """Merge one data set's :func:`quality_entry` (and run details) into ``eval.json`` and
    rewrite ``eval.md`` from it."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "eval.json"
    report = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    report["datasets"][name] = entry
    path.write_text(json.dumps(report, indent=2))
    lines = ["# Offline evaluation", "", "Full ranking, seen items filtered.", ""]
    for ds_name, entry in report["datasets"].items():
        lines += [f"## {ds_name}", "", "Leave-last-out (each user's last event):", ""]
        lines += _section_lines(entry)
        sections = [k for k in entry if k.startswith("last_")]
        for key in sections:
            n = key.split("_")[1]
            lines += [f"Each user's last {n} events, each against the history up to it:", ""]
            lines += _section_lines(entry[key])
        if "choices" in entry:
            lines += [_choices_line(entry["choices"]), ""]
        if "stages" in entry:
            lines += ["Where quality is lost (OneRec, every held-out event):", ""]
            lines += [*stage_lines(entry["stages"]), ""]
        shown = {"models", "targets", "stages", "choices", *sections}
        extra = {k: v for k, v in entry.items() if k not in shown}
        if extra:
            lines += ["```", json.dumps(extra, indent=2), "```", ""]
    (reports / "eval.md").write_text("\n".join(lines))


def _choices_line(choices: dict[str, Any]) -> str:
    line = (
        f"Chosen for this data set: codebook size {choices['codebook_size']} (the rule of "
        f"catalog size, {choices['items']:,} items)"
    )
    if "rank_weight" in choices:
        line += f", ranking weight {choices['rank_weight']} (fitted on validation events)"
    return line + "; every other setting is make eval's, the same for every data set."


def _section_lines(section: dict[str, Any]) -> list[str]:
    lines = ["| model | Recall@10 | NDCG@10 | Recall@50 | NDCG@50 |", "|---|---|---|---|---|"]
    for model, m in section["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    return [*lines, "", *(f"- {TargetCheck(**c).line()}" for c in section["targets"]), ""]
