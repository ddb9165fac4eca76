"""What the command groups share: the console, argument knobs, and printers."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from onerec.data.schema import Dataset
from onerec.data.synthetic import SyntheticConfig
from onerec.runtime.config import OneRecConfig
from onerec.runtime.onnx_runners import OnnxOneRec
from onerec.tokenizer import TokenizerConfig
from onerec.train_config import TrainConfig

console = Console()


STORE_HELP = (
    "redis://host:port/db (password: $ONEREC_REDIS_PASSWORD) or a SQLite file "
    "(default <artifacts>/features.sqlite)"
)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_synthetic_knobs(p: argparse.ArgumentParser) -> None:
    defaults = SyntheticConfig()
    p.add_argument("--users", type=int, default=defaults.n_users)
    p.add_argument("--items", type=int, default=defaults.n_items)
    p.add_argument("--max-history", type=int, default=defaults.max_history)
    p.add_argument("--seed", type=int, default=defaults.seed)


def add_tokenizer_knobs(p: argparse.ArgumentParser) -> None:
    defaults = TokenizerConfig()
    p.add_argument("--levels", type=int, default=defaults.levels)
    p.add_argument(
        "--codebook-size",
        type=int,
        default=defaults.codebook_size,
        help="codes per level (default: by catalog size, onerec.tokenizer.codebook_size_for)",
    )
    p.add_argument("--iters", type=int, default=defaults.iters)


def add_budget_knobs(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    p.add_argument(
        "--minutes", type=float, default=defaults.max_minutes, help="SID model's time budget"
    )
    p.add_argument(
        "--ranker-minutes",
        type=float,
        default=defaults.ranker_minutes,
        help="then the ranking stage's, on its own",
    )


def synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        n_users=args.users, n_items=args.items, max_history=args.max_history, seed=args.seed
    )


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(
        levels=args.levels, codebook_size=args.codebook_size, iters=args.iters, seed=args.seed
    )


def print_dataset(ds: Dataset) -> None:
    table = Table(title=f"data set: {ds.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in ds.summary().items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def print_tokenizer(stats: dict) -> None:
    table = Table(title="RQ-KMeans semantic IDs")
    for col in ("level", "cluster min", "cluster max", "capacity", "quantisation error"):
        table.add_column(col, justify="right")
    for lv in stats["levels"]:
        table.add_row(
            str(lv["level"]),
            str(lv["cluster_min"]),
            str(lv["cluster_max"]),
            str(lv["capacity"]),
            f"{lv['quantisation_error']:.4f}",
        )
    console.print(table)
    console.print(
        f"items {stats['items']:,}  unique SIDs {stats['unique_sids']:,}  "
        f"collision rate {stats['collision_rate']:.4%}  "
        f"max items per SID {stats['max_items_per_sid']}  "
        f"input energy {stats['input_energy']:.4f}  time {stats['seconds']:.1f}s"
    )


def losses_text(result: dict) -> str:
    text = f"SID loss {result['loss']:.3f}"
    if "next_item_loss" in result:
        text += f", next-item loss {result['next_item_loss']:.3f}"
    return text


def print_kept_epoch(result: dict) -> None:
    if "best_epoch" in result:
        console.print(
            f"kept epoch {result['best_epoch']} (validation loss {result['validation_loss']:.3f})"
        )
    if "ranker_validation_loss" in result:
        console.print(
            f"ranking stage alone: {result['ranker_epochs']} epochs, kept epoch "
            f"{result['ranker_best_epoch']} (validation next-item loss "
            f"{result['ranker_validation_loss']:.3f})"
        )
    if "rank_weight" in result:
        fit = ", ".join(f"{w}: {v:.4f}" for w, v in result["rank_weight_ndcg@10"].items())
        console.print(f"ranking-stage weight {result['rank_weight']} (validation NDCG@10 {fit})")


def serving_pathways(artifacts: Path, cfg: OneRecConfig, users: int, seed: int) -> list:
    """Pathways of a seeded sample of users, as the front end builds them after their last
    event (the lifelong compression runs here, outside the timed loop)."""
    from onerec.event_arrays import EventArrays
    from onerec.runtime.pathways import build_pathways

    ds = Dataset.load(artifacts / "data")
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    vectors = np.load(artifacts / "tokenizer" / "item_embeddings.npy")
    chosen = np.random.default_rng(seed).choice(ds.n_users, min(users, ds.n_users), replace=False)
    out = []
    for u in chosen:
        h = events.user(int(u))
        out.append(build_pathways(h, int(h.timestamp[-1]) + 1000, static[u], vectors, cfg))
    return out


def print_parity(model, onnx: OnnxOneRec, artifacts: Path, trie, users: int = 8) -> None:
    """The exported graphs against torch on real users (the tests do it on random ones)."""
    from onerec.export import parity

    pathways = serving_pathways(artifacts, model.cfg, users, seed=0)
    console.print(str(parity(model, onnx, pathways, trie, beam_width=128)))
