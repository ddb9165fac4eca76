"""``onerec train``, ``eval`` and ``export``: the model, offline (these need torch)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from onerec.cli.common import (
    add_budget_knobs,
    console,
    losses_text,
    print_kept_epoch,
    print_parity,
)
from onerec.train_config import TrainConfig


def cmd_train(args: argparse.Namespace) -> int:
    """Train the OneRec model on a built artefact directory."""
    from onerec.experiment import train_artifacts

    sizes = {}
    if args.d_model is not None:
        sizes = {"d_model": args.d_model, "d_ff": 2 * args.d_model, "d_expert": 2 * args.d_model}
    for name in ("lifelong_len", "positive_len", "n_queries"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        samples_per_user=args.samples_per_user,
        max_minutes=args.minutes,
        ranker_minutes=args.ranker_minutes,
        threads=args.threads,
        seed=args.seed,
        keep_best=args.keep_best,
    )
    result = train_artifacts(Path(args.artifacts), cfg, sizes, resume=args.resume)
    console.print(
        f"trained {result['parameters']:,} parameters on {result['samples']:,} samples: "
        f"{losses_text(result)}, {result['epochs']} epochs, {result['seconds']:.0f}s"
    )
    print_kept_epoch(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate OneRec against popularity, SASRec and (synthetic) the oracle."""
    from onerec.experiment import (
        METRICS,
        TargetCheck,
        evaluate_artifacts,
        per_dataset_choices,
        quality_entry,
        write_eval_report,
    )
    from onerec.stage_analysis import stage_lines

    artifacts = Path(args.artifacts)
    started = time.perf_counter()
    evaluation = evaluate_artifacts(
        artifacts, args.beam_width, args.sasrec_epochs, args.max_users, args.seed
    )
    entry = quality_entry(evaluation) | {
        "choices": per_dataset_choices(artifacts),
        "beam_width": args.beam_width,
        "users": args.max_users or "all",
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = args.name or artifacts.name
    write_eval_report(name, entry, Path(args.reports))
    for key in ("", *(k for k in entry if k.startswith("last_"))):
        section = entry[key] if key else entry
        table = Table(title=f"evaluation: {name}" + (f", {key.replace('_', ' ')}" if key else ""))
        table.add_column("model")
        for metric in METRICS:
            table.add_column(metric, justify="right")
        for model, m in section["models"].items():
            table.add_row(model, *(f"{m[k]:.4f}" for k in METRICS))
        console.print(table)
        for check in section["targets"]:
            console.print(TargetCheck(**check).line())
    console.print("\n".join(stage_lines(entry["stages"])))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX encoder and decoder steps from a trained artefact directory."""
    from onerec.experiment import load_item_tables, load_model
    from onerec.export import export
    from onerec.runtime.onnx_runners import OnnxOneRec

    artifacts = Path(args.artifacts)
    _, item_tables, index = load_item_tables(artifacts)
    model = load_model(artifacts, item_tables)
    out = Path(args.out or artifacts / "onnx")
    for path in export(model, out):
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print_parity(model, OnnxOneRec(out), artifacts, index.trie)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec train``, ``eval`` and ``export``."""
    defaults = TrainConfig()
    p = sub.add_parser("train", help="train the OneRec model on a built artefact directory")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    add_budget_knobs(p, defaults)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--samples-per-user", type=int, default=defaults.samples_per_user)
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--d-model", type=int, help="width; feed-forward and experts get 2x")
    p.add_argument("--lifelong-len", type=int)
    p.add_argument("--positive-len", type=int)
    p.add_argument("--n-queries", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from model/checkpoint.pt")
    p.add_argument(
        "--keep-best",
        action=argparse.BooleanOptionalAction,
        default=defaults.keep_best,
        help="hold out each user's second-to-last event and keep the epoch that fits it best",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate against popularity, SASRec and the oracle")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--name", help="data set name in the report (default: directory name)")
    p.add_argument("--reports", default="reports")
    p.add_argument("--beam-width", type=int, default=128)
    p.add_argument("--sasrec-epochs", type=int, default=30)
    p.add_argument("--max-users", type=int, help="evaluate a seeded sample of users")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export the trained model to ONNX")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--out", help="directory (default <artifacts>/onnx)")
    p.set_defaults(func=cmd_export)
