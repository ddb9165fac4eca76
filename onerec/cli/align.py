"""``onerec reward``, ``align`` and ``align-eval``: the reward model (P-Score), RL
post-training of the generator against it, and the alignment report (torch, offline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onerec.align_config import METHODS, AlignConfig
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


def cmd_align(args: argparse.Namespace) -> int:
    """RL post-training of a trained generator (ECPO, GRPO or DPO) against the P-Score."""
    from onerec.align import align_artifacts

    fields = AlignConfig.__dataclass_fields__
    cfg = AlignConfig(**{k: v for k, v in vars(args).items() if k in fields})
    path, result = align_artifacts(Path(args.artifacts), cfg, args.name, console.print)
    first, last = result["curves"][0], result["curves"][-1]
    console.print(
        f"{cfg.method}: {result['steps']} steps in {result['seconds']:.0f}s; reward "
        f"{first['reward']:.4f} -> {result['final_reward']:.4f}, KL {last['kl']:.4f}; "
        f"legal unconstrained {result['legal_unconstrained_before']:.3f} -> "
        f"{result['legal_unconstrained_after']:.3f}; wrote {path} and {path.with_suffix('.png')}"
    )
    return 0


def cmd_align_eval(args: argparse.Namespace) -> int:
    """The alignment rows, graded by the simulator where the data has one."""
    from onerec.align import aligned_path, plot_curves
    from onerec.align_eval import evaluate_alignment
    from onerec.align_report import COLUMNS, merge

    artifacts = Path(args.artifacts)
    section = evaluate_alignment(
        artifacts,
        args.max_users,
        args.seed,
        args.beam_width,
        extra=tuple(args.extra),
        blend=args.blend,
        progress=console.print,
    )
    name = args.name or artifacts.name
    merge(Path(args.reports), name, section)
    curves = {
        run: json.loads(aligned_path(artifacts, run).with_suffix(".json").read_text())["curves"]
        for run in section["alignment"]
    }
    if curves:
        plot_curves(curves, Path(args.reports) / f"align_curves_{name}.png")
    for row, values in {**section["models"], **section["ablations"]}.items():
        cells = ", ".join(f"{c} {values[c]:.4f}" for c in COLUMNS if values.get(c) is not None)
        console.print(f"{row}: {cells}")
    console.print(f"blend {section['blend']}; wrote {args.reports}/align.json and align.md")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec reward``, ``align`` and ``align-eval``."""
    defaults = RewardConfig()
    p = sub.add_parser("reward", help="train the reward model (P-Score) and report its AUCs")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--name", help="data set name in the report (default: directory name)")
    p.add_argument("--reports", default="reports")
    p.add_argument("--minutes", type=float, default=defaults.minutes)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(func=cmd_reward)

    d = AlignConfig()
    p = sub.add_parser("align", help="RL post-training of the generator against the P-Score")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--name", help="checkpoint model/aligned_<name>.pt (default: the method)")
    p.add_argument("--search", choices=("beam", "sample"), default=d.search)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--users-per-step", type=int, default=d.users_per_step)
    p.add_argument("--group", type=int, default=d.group, help="SIDs per user")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--clip-eps", type=float, default=d.clip_eps)
    p.add_argument("--delta", type=float, default=d.delta, help="ECPO's early bound")
    p.add_argument("--kl-beta", type=float, default=d.kl_beta, help="GRPO's KL weight")
    p.add_argument("--dpo-beta", type=float, default=d.dpo_beta)
    p.add_argument("--ntp-weight", type=float, default=d.ntp_weight)
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("align-eval", help="the alignment rows of reports/align.json")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--name", help="data set name in the report (default: directory name)")
    p.add_argument("--reports", default="reports")
    p.add_argument("--max-users", type=int, help="a seeded sample of users (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beam-width", type=int, default=128)
    p.add_argument(
        "--extra", nargs="*", default=[], help="more model/aligned_<name>.pt, as ablations"
    )
    p.add_argument(
        "--blend",
        type=float,
        help="grade the reward rows at this blend (a build's served one) instead of fitting it",
    )
    p.set_defaults(func=cmd_align_eval)
