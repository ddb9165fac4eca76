"""``onerec reward``: the reward model (P-Score), offline (needs torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from onerec.cli.common import console
from onerec.train_config import RewardConfig


def cmd_reward(args: argparse.Namespace) -> int:
    """Train the reward model on a built artefact directory and report its AUCs."""
    from onerec.align_report import merge
    from onerec.reward import fit_reward

    artifacts = Path(args.artifacts)
    cfg = RewardConfig(minutes=args.minutes, epochs=args.epochs, seed=args.seed)
    _, result = fit_reward(artifacts, cfg, console.print)
    aucs = result.pop("aucs")
    name = args.name or artifacts.name
    heads = {h: r["head"] for h, r in aucs.items() if r.get("head") is not None}
    merge(Path(args.reports), name, {"reward_auc": heads, "reward_detail": aucs})
    console.print(
        f"reward model: {result['steps']:,} steps in {result['seconds']:.0f}s on "
        f"{result['train_exposures']:,} exposures; AUC on {result['test_exposures']:,} "
        "held out: " + ", ".join(f"{h} {a:.3f}" for h, a in heads.items())
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec reward``."""
    defaults = RewardConfig()
    p = sub.add_parser("reward", help="train the reward model (P-Score) and report its AUCs")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--name", help="data set name in the report (default: directory name)")
    p.add_argument("--reports", default="reports")
    p.add_argument("--minutes", type=float, default=defaults.minutes)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=cmd_reward)
