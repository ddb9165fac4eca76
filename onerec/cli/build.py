"""``onerec build``: the offline pipeline, stage by stage, each reused when present.

data set -> item embeddings and semantic IDs -> trained model -> reward model (P-Score)
-> a short ECPO stage against it -> Triton model repository (ONNX of the aligned generator,
the model's items, the catalog, the reward model) -> the feature store's initial contents.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onerec.cli.common import (
    STORE_HELP,
    add_budget_knobs,
    add_synthetic_knobs,
    add_tokenizer_knobs,
    console,
    losses_text,
    print_dataset,
    print_kept_epoch,
    print_parity,
    print_tokenizer,
    synthetic_config,
    tokenizer_config,
)
from onerec.data.schema import Dataset
from onerec.runtime.config import OneRecConfig
from onerec.runtime.layout import DECODER, DEFAULT_INSTANCES, ENCODER, MODEL_ITEMS, TEMPLATE
from onerec.train_config import RewardConfig, TrainConfig

STAGES = ("data", "tokenizer", "model", "repository")


def cmd_build(args: argparse.Namespace) -> int:
    """The offline pipeline: data set -> embeddings -> semantic IDs -> trained model ->
    Triton model repository. Each stage reuses what an earlier run left (``--force``
    redoes them); ``--until`` stops early."""
    from onerec.semantic_ids import load_tokenizer_stats, tokenize_dataset

    out = Path(
        args.out
        or f"artifacts/{'synthetic' if args.source == 'synthetic' else Path(args.source).name}"
    )
    started = time.perf_counter()
    ds = _load_or_make(args.source, out / "data", args)
    print_dataset(ds)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() and not args.force:
        stats = load_tokenizer_stats(tok_dir)
        if stats.get("test_events", 1) != args.test_events:
            raise SystemExit(
                f"{tok_dir} holds out {stats.get('test_events', 1)} events per user, not "
                f"--test-events {args.test_events}: rebuild it with --force"
            )
        console.print(f"reusing tokenizer in {tok_dir} (--force rebuilds)")
    else:
        stats = tokenize_dataset(ds, tok_dir, tokenizer_config(args), test_events=args.test_events)
    print_tokenizer(stats)
    if STAGES.index(args.until) >= STAGES.index("model"):
        _build_model(out, args)
    console.print(
        f"[bold]build done[/] in {time.perf_counter() - started:.1f}s: artefacts in {out}"
    )
    return 0


def _load_or_make(source: str, data_dir: Path, args: argparse.Namespace) -> Dataset:
    from onerec.data.loaders import load_source
    from onerec.data.synthetic import generate

    if (data_dir / "meta.json").is_file() and not args.force:
        console.print(f"reusing data set in {data_dir} (--force rebuilds)")
        return Dataset.load(data_dir)
    started = time.perf_counter()
    ds = (
        generate(synthetic_config(args), progress=True)
        if source == "synthetic"
        else load_source(source)
    )
    ds.save(data_dir)
    console.print(f"built data set {ds.name} in {time.perf_counter() - started:.1f}s -> {data_dir}")
    return ds


def _build_model(out: Path, args: argparse.Namespace) -> None:
    from onerec.experiment import (
        CHECKPOINT,
        SERVED_FILE,
        load_item_tables,
        load_model,
        train_artifacts,
    )
    from onerec.repository import model_items, write_model_repository
    from onerec.runtime.onnx_runners import OnnxOneRec
    from onerec.semantic_ids import load_item_sids

    checkpoint = out / "model" / CHECKPOINT
    if checkpoint.is_file() and not args.force:
        console.print(f"reusing model in {checkpoint} (--force retrains)")
    else:
        cfg = TrainConfig(max_minutes=args.minutes, ranker_minutes=args.ranker_minutes)
        result = train_artifacts(out, cfg, {})
        console.print(
            f"trained {result['parameters']:,} parameters: {losses_text(result)} "
            f"in {result['seconds']:.0f}s"
        )
        print_kept_epoch(result)
    if args.until != "repository":
        return
    _, item_tables, catalog_index = load_item_tables(out)
    reward, blend = None, 0.0
    if args.reward_minutes > 0:
        reward = _build_reward(out, args)
    served = _align(out, args) if reward is not None and args.align_steps > 0 else CHECKPOINT
    model = load_model(out, item_tables, served)
    if reward is not None:
        blend = args.reward_blend
        if blend is None:
            blend = _served_blend(out, reward, model, served)
    version = write_model_repository(
        model,
        load_item_sids(out / "tokenizer"),
        model_items(out),
        args.repository,
        args.encoder_instances,
        args.decoder_instances,
        reward,
        blend,
    )
    (out / "model" / SERVED_FILE).write_text(json.dumps({"generator": served}) + "\n")
    console.print(
        f"model repository {args.repository}: ONNX of {served} written, catalog v{version} live"
    )
    repo = Path(args.repository)
    onnx = OnnxOneRec(repo / ENCODER / "1", decoder_directory=repo / DECODER / "1")
    print_parity(model, onnx, out, catalog_index.trie)
    store = args.feature_store or str(out / "features.sqlite")
    load_features(out, repo, store, args.force)


def _fresh(path: Path, *inputs: Path) -> bool:
    """Whether ``path`` exists and was written after every one of ``inputs``: a stage whose
    inputs were rebuilt since is rebuilt too."""
    if not path.is_file():
        return False
    written = path.stat().st_mtime_ns
    return all(written >= p.stat().st_mtime_ns for p in inputs if p.is_file())


def _build_reward(out: Path, args: argparse.Namespace):
    """The reward model the server orders answers by: reused, or trained on the build's
    data set within ``--reward-minutes``."""
    from onerec.experiment import load_item_tables
    from onerec.reward import REWARD_FILE, fit_reward, load_reward

    path = out / "model" / REWARD_FILE
    if path.is_file() and not args.force:
        console.print(f"reusing reward model in {path} (--force retrains)")
        ds, item_tables, index = load_item_tables(out)
        return load_reward(path, ds, item_tables, index.trie.codebook_size)
    model, result = fit_reward(out, RewardConfig(minutes=args.reward_minutes))
    aucs = {h: r["head"] for h, r in result["aucs"].items() if r.get("head") is not None}
    console.print(
        f"reward model: {result['steps']:,} steps in {result['seconds']:.0f}s; held-out "
        "AUC " + ", ".join(f"{h} {a:.3f}" for h, a in aucs.items())
    )
    return model


def _align(out: Path, args: argparse.Namespace) -> str:
    """ECPO against the reward model, ``--align-steps`` within ``--align-minutes``: the
    generator the build serves (reused while newer than the model and reward model)."""
    from onerec.align import align_artifacts, aligned_path
    from onerec.align_config import AlignConfig
    from onerec.experiment import CHECKPOINT
    from onerec.reward import REWARD_FILE

    path = aligned_path(out, "ecpo")
    inputs = (out / "model" / CHECKPOINT, out / "model" / REWARD_FILE)
    if _fresh(path, *inputs) and not args.force:
        console.print(f"reusing aligned generator {path} (--force realigns)")
        return path.name
    cfg = AlignConfig(method="ecpo", steps=args.align_steps, minutes=args.align_minutes)
    path, result = align_artifacts(out, cfg, "ecpo")
    console.print(
        f"ECPO: {result['steps']} steps in {result['seconds']:.0f}s; P-Score of its groups "
        f"{result['curves'][0]['reward']:.3f} -> {result['final_reward']:.3f}; unconstrained "
        f"beams legal {result['legal_unconstrained_before']:.2f} -> "
        f"{result['legal_unconstrained_after']:.2f} (the served search stays trie-constrained)"
    )
    return path.name


def _served_blend(out: Path, reward, model, served: str) -> float:
    """The P-Score's blend with the served generator's SID log-probability, fitted on
    validation events; reused while newer than the generator and the reward model."""
    from onerec.align_eval import BLEND_FILE, fit_served_blend
    from onerec.reward import REWARD_FILE

    path = out / "model" / BLEND_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    inputs = (out / "model" / served, out / "model" / REWARD_FILE)
    if _fresh(path, *inputs) and record.get("generator") == served:
        return float(record["blend"])
    started = time.perf_counter()
    blend = fit_served_blend(out, reward, model, served)
    console.print(f"reward blend {blend} fitted in {time.perf_counter() - started:.0f}s")
    return blend


def load_features(artifacts: Path, repository: Path, store: str, force: bool) -> None:
    """The initial feature store from the build's data set, unless it holds users: every
    user's lifelong record is compressed here with the served model's item vectors and
    lifelong length, so requests never run k-means."""
    from onerec.feature_load import load_store
    from onerec.runtime.model_items import ModelItems
    from server.feature_store import stored_users
    from server.redis_store import redact

    where = redact(store)
    if stored_users(store) and not force:
        console.print(f"reusing feature store {where} (--force replaces its users)")
        return
    started = time.perf_counter()
    encoder = repository / ENCODER / "1"
    cfg = OneRecConfig(**json.loads((encoder / "model.json").read_text()))
    vectors = ModelItems.load(encoder / MODEL_ITEMS).vectors
    ds = Dataset.load(artifacts / "data")
    load_store(ds, store, vectors, cfg.lifelong_len, progress=console.is_terminal)
    console.print(f"feature store {where} in {time.perf_counter() - started:.1f}s")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec build``."""
    p = sub.add_parser("build", help="build the served artefacts from a data set")
    p.add_argument("--source", default="synthetic", help="'synthetic' or a path a loader reads")
    p.add_argument("--out", help="artefact directory (default artifacts/<name>)")
    p.add_argument("--force", action="store_true", help="rebuild even if artefacts exist")
    p.add_argument("--until", choices=STAGES, default="repository", help="last stage to build")
    p.add_argument("--repository", default=str(TEMPLATE), help="Triton model repository")
    p.add_argument(
        "--test-events",
        type=int,
        default=1,
        help="each user's last events held out of the SIDs and of training, for evaluation",
    )
    add_budget_knobs(p, TrainConfig())
    p.add_argument(
        "--reward-minutes",
        type=float,
        default=1.0,
        help="the reward model's training budget (0: serve without reward selection)",
    )
    p.add_argument(
        "--reward-blend",
        type=float,
        help="serve this weight of the SID log-probability beside the P-Score instead of "
        "fitting it (lower: more engagement, less recall; docs/alignment.md)",
    )
    p.add_argument(
        "--align-steps",
        type=int,
        default=20,
        help="ECPO steps against the reward model before export (0: serve the generator as "
        "trained)",
    )
    p.add_argument("--align-minutes", type=float, default=2.0, help="ECPO's time budget")
    p.add_argument("--encoder-instances", type=int, default=DEFAULT_INSTANCES)
    p.add_argument("--decoder-instances", type=int, default=DEFAULT_INSTANCES)
    p.add_argument("--feature-store", help=STORE_HELP)
    add_synthetic_knobs(p)
    add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_build)
