"""The ``onerec`` command line: data sets, tokenizer, the offline build and benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from onerec import catalog
from onerec.data.loaders import load_source
from onerec.data.schema import DataError, Dataset
from onerec.data.synthetic import SyntheticConfig, generate
from onerec.embeddings import item_embeddings
from onerec.experiment import (
    METRICS,
    evaluate_artifacts,
    load_catalog,
    load_model,
    target_checks,
    train_artifacts,
    write_eval_report,
)
from onerec.export import export, parity
from onerec.metrics import metrics_from_ranks
from onerec.model import OneRecConfig
from onerec.onnx_model import OnnxOneRec
from onerec.pathways import EventArrays, build_pathways
from onerec.repository import DECODER, ENCODER, TEMPLATE, catalog_dir, write_model_repository
from onerec.semantic_ids import load_item_sids, tokenize_dataset, tokenize_new_items
from onerec.tokenizer import SemanticTokenizer, TokenizerConfig, collision_stats
from onerec.train import TrainConfig

console = Console()


def _add_synthetic_knobs(p: argparse.ArgumentParser) -> None:
    defaults = SyntheticConfig()
    p.add_argument("--users", type=int, default=defaults.n_users)
    p.add_argument("--items", type=int, default=defaults.n_items)
    p.add_argument("--max-history", type=int, default=defaults.max_history)
    p.add_argument("--seed", type=int, default=defaults.seed)


def _add_tokenizer_knobs(p: argparse.ArgumentParser) -> None:
    defaults = TokenizerConfig()
    p.add_argument("--levels", type=int, default=defaults.levels)
    p.add_argument("--codebook-size", type=int, default=defaults.codebook_size)
    p.add_argument("--iters", type=int, default=defaults.iters)


def _synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        n_users=args.users, n_items=args.items, max_history=args.max_history, seed=args.seed
    )


def _tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    return TokenizerConfig(
        levels=args.levels, codebook_size=args.codebook_size, iters=args.iters, seed=args.seed
    )


def _print_dataset(ds: Dataset) -> None:
    table = Table(title=f"data set: {ds.name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in ds.summary().items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def _print_tokenizer(stats: dict) -> None:
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


def _load_or_make(source: str, data_dir: Path, args: argparse.Namespace) -> Dataset:
    if (data_dir / "meta.json").is_file() and not args.force:
        console.print(f"reusing data set in {data_dir} (--force rebuilds)")
        return Dataset.load(data_dir)
    started = time.perf_counter()
    ds = (
        generate(_synthetic_config(args), progress=True)
        if source == "synthetic"
        else load_source(source)
    )
    ds.save(data_dir)
    console.print(f"built data set {ds.name} in {time.perf_counter() - started:.1f}s -> {data_dir}")
    return ds


def cmd_build(args: argparse.Namespace) -> int:
    """The offline pipeline: data set -> embeddings -> semantic IDs -> trained model ->
    Triton model repository. Each stage reuses what an earlier run left (``--force``
    redoes them); ``--until`` stops early."""
    out = Path(
        args.out
        or f"artifacts/{'synthetic' if args.source == 'synthetic' else Path(args.source).name}"
    )
    started = time.perf_counter()
    ds = _load_or_make(args.source, out / "data", args)
    _print_dataset(ds)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() and not args.force:
        stats = json.loads((tok_dir / "tokenizer.json").read_text())
        console.print(f"reusing tokenizer in {tok_dir} (--force rebuilds)")
    else:
        stats = tokenize_dataset(ds, tok_dir, _tokenizer_config(args))
    _print_tokenizer(stats)
    if STAGES.index(args.until) >= STAGES.index("model"):
        _build_model(out, args)
    console.print(
        f"[bold]build done[/] in {time.perf_counter() - started:.1f}s: artefacts in {out}"
    )
    return 0


STAGES = ("data", "tokenizer", "model", "repository")
STORE_HELP = (
    "redis://host:port/db (password: $ONEREC_REDIS_PASSWORD) or a SQLite file "
    "(default <artifacts>/features.sqlite)"
)


def _build_model(out: Path, args: argparse.Namespace) -> None:
    checkpoint = out / "model" / "checkpoint.pt"
    if checkpoint.is_file() and not args.force:
        console.print(f"reusing model in {checkpoint} (--force retrains)")
    else:
        cfg = TrainConfig(max_minutes=args.minutes, ranker_minutes=args.ranker_minutes)
        result = train_artifacts(out, cfg, {})
        console.print(
            f"trained {result['parameters']:,} parameters: {_losses_text(result)} "
            f"in {result['seconds']:.0f}s"
        )
        _print_kept_epoch(result)
    if args.until != "repository":
        return
    _, catalog, catalog_index = load_catalog(out)
    model = load_model(out, catalog)
    version = write_model_repository(
        model,
        load_item_sids(out / "tokenizer"),
        args.repository,
        args.encoder_instances,
        args.decoder_instances,
    )
    console.print(f"model repository {args.repository}: ONNX written, catalog v{version} live")
    repo = Path(args.repository)
    onnx = OnnxOneRec(repo / ENCODER / "1", decoder_directory=repo / DECODER / "1")
    _print_parity(model, onnx, out, catalog_index.trie)
    _load_features(out, args.feature_store or str(out / "features.sqlite"), args.force)


def _load_features(artifacts: Path, store: str, force: bool) -> None:
    """The initial feature store from the build's data set, unless it holds users."""
    from server.feature_store import load_store, stored_users
    from server.redis_store import redact

    where = redact(store)
    if stored_users(store) and not force:
        console.print(f"reusing feature store {where} (--force replaces its users)")
        return
    started = time.perf_counter()
    load_store(Dataset.load(artifacts / "data"), store, progress=console.is_terminal)
    console.print(f"feature store {where} in {time.perf_counter() - started:.1f}s")


def cmd_features_load(args: argparse.Namespace) -> int:
    """Load the build's users and events into a feature store: the chart's Job, or a
    Redis for a fleet. Waits up to --wait-s for the store to answer while it starts."""
    from server.feature_store import StoreUnavailable, stored_users

    store = args.feature_store or os.environ.get("ONEREC_FEATURE_STORE")
    store = store or str(Path(args.artifacts) / "features.sqlite")
    deadline = time.monotonic() + args.wait_s
    while True:
        try:
            stored_users(store)
            break
        except StoreUnavailable as e:
            if time.monotonic() > deadline:
                console.print(f"[red]feature store unavailable:[/] {e}")
                return 1
            time.sleep(2.0)
    _load_features(Path(args.artifacts), store, args.force)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ds = generate(_synthetic_config(args), progress=True)
    ds.save(args.out)
    _print_dataset(ds)
    console.print(f"written to {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_data_load(args: argparse.Namespace) -> int:
    ds = load_source(args.source)
    if args.out:
        ds.save(args.out)
    _print_dataset(ds)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    ds = load_source(args.data)
    stats = tokenize_dataset(ds, args.out, _tokenizer_config(args))
    _print_tokenizer(stats)
    return 0


def cmd_bench_tokenizer(args: argparse.Namespace) -> int:
    """Printed, not asserted: embeddings and RQ-KMeans for a synthetic catalog of N items."""
    started = time.perf_counter()
    ds = generate(
        SyntheticConfig(
            n_users=args.users, n_items=args.items, max_history=args.max_history, seed=args.seed
        )
    )
    data_s = time.perf_counter() - started
    started = time.perf_counter()
    _, x = item_embeddings(ds.item_content, ds.user_index(), ds.item_index(), seed=args.seed)
    embed_s = time.perf_counter() - started
    cfg = _tokenizer_config(args)
    started = time.perf_counter()
    _, codes, stats = SemanticTokenizer.fit(x, cfg)
    stats["seconds"] = time.perf_counter() - started
    stats.update(collision_stats(codes))
    _print_tokenizer(stats)
    console.print(
        f"{len(ds.events):,} events: data {data_s:.1f}s, embeddings {embed_s:.1f}s; "
        f"tokenizer for {args.items:,} items x {x.shape[1]} dims, K={cfg.codebook_size}: "
        f"[bold]{stats['seconds']:.1f}s[/]"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the OneRec model on a built artefact directory."""
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
        f"{_losses_text(result)}, {result['epochs']} epochs, {result['seconds']:.0f}s"
    )
    _print_kept_epoch(result)
    return 0


def _add_budget_knobs(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    p.add_argument(
        "--minutes", type=float, default=defaults.max_minutes, help="SID model's time budget"
    )
    p.add_argument(
        "--ranker-minutes",
        type=float,
        default=defaults.ranker_minutes,
        help="then the ranking stage's, on its own",
    )


def _losses_text(result: dict) -> str:
    text = f"SID loss {result['loss']:.3f}"
    if "next_item_loss" in result:
        text += f", next-item loss {result['next_item_loss']:.3f}"
    return text


def _print_kept_epoch(result: dict) -> None:
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate OneRec against popularity, SASRec and (synthetic) the oracle."""
    artifacts = Path(args.artifacts)
    started = time.perf_counter()
    evaluation = evaluate_artifacts(
        artifacts, args.beam_width, args.sasrec_epochs, args.max_users, args.seed
    )
    ranks = evaluation.ranks
    details = {
        "beam_width": args.beam_width,
        "users": args.max_users or "all",
        "seconds": round(time.perf_counter() - started, 1),
        "training": evaluation.training,
    }
    results = {model: metrics_from_ranks(r) for model, r in ranks.items()}
    checks = target_checks(ranks)
    write_eval_report(args.name or artifacts.name, results, checks, Path(args.reports), details)
    table = Table(title=f"evaluation: {args.name or artifacts.name}")
    table.add_column("model")
    for metric in METRICS:
        table.add_column(metric, justify="right")
    for model, m in results.items():
        table.add_row(model, *(f"{m[k]:.4f}" for k in METRICS))
    console.print(table)
    for check in checks:
        console.print(check.line())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX encoder and decoder steps from a trained artefact directory."""
    artifacts = Path(args.artifacts)
    _, catalog, index = load_catalog(artifacts)
    model = load_model(artifacts, catalog)
    out = Path(args.out or artifacts / "onnx")
    for path in export(model, out):
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    _print_parity(model, OnnxOneRec(out), artifacts, index.trie)
    return 0


def _print_parity(model, onnx: OnnxOneRec, artifacts: Path, trie, users: int = 8) -> None:
    """The exported graphs against torch on real users (the tests do it on random ones)."""
    pathways = _serving_pathways(artifacts, model.cfg, users, seed=0)
    console.print(str(parity(model, onnx, pathways, trie, beam_width=128)))


def cmd_triton(args: argparse.Namespace) -> int:
    """Serve a model repository with the local tritonserver until SIGINT/SIGTERM."""
    from server.triton_client import probe, repository_config
    from server.triton_launcher import TritonPorts, TritonProcess
    from server.triton_supervisor import TritonSupervisor, serve_forever

    logging.getLogger("server").setLevel(logging.INFO)
    cfg = repository_config(args.repository)
    ports = TritonPorts()
    for name in ("http", "grpc", "metrics"):
        if getattr(args, f"{name}_port") is not None:
            setattr(ports, name, getattr(args, f"{name}_port"))
    process = TritonProcess(args.repository, ports, probe=lambda url: probe(url, cfg))
    return serve_forever(TritonSupervisor(process))


def cmd_serve(args: argparse.Namespace) -> int:
    """The front end, with a local Triton unless --triton-url names a running one."""
    import asyncio
    from dataclasses import replace

    from server.app import Settings, serve
    from server.triton_client import probe, repository_config
    from server.triton_launcher import TritonProcess
    from server.triton_supervisor import TritonSupervisor
    from server.validation import MAX_BEAM_WIDTH

    logging.getLogger("server").setLevel(logging.INFO)
    # Triton's own start-up chatter stays out of the way; its warnings and errors show.
    logging.getLogger("server.triton_launcher.tritonserver").setLevel(logging.WARNING)
    s = Settings()
    for name in ("artifacts", "repository"):
        if getattr(args, name) is not None:
            setattr(s, name, Path(getattr(args, name)))
    for name in (
        "triton_url",
        "feature_store",
        "port",
        "metrics_port",
        "max_inflight",
        "auth_token_file",
        "tls_cert",
        "tls_key",
        "peak_flops",
        "drain_s",
        "grace_s",
    ):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.max_count is not None:
        s.limits = replace(s.limits, max_count=args.max_count)
    if not 1 <= s.limits.max_count <= MAX_BEAM_WIDTH:
        console.print(f"[red]--max-count must be in 1..{MAX_BEAM_WIDTH}[/]")
        return 2
    triton = None
    if args.triton_url is None and not os.environ.get("ONEREC_TRITON_URL"):
        cfg = repository_config(s.repository)
        process = TritonProcess(s.repository, probe=lambda url: probe(url, cfg))
        triton = TritonSupervisor(process).start()
        s.triton_url = triton.grpc_url
    try:
        asyncio.run(serve(s, triton=triton))
    finally:
        if triton is not None:
            triton.stop()
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Call a running front end and print its answer as a table."""
    import grpc
    import pandas as pd

    from onerec.v1 import recommender_pb2 as pb
    from onerec.v1 import recommender_pb2_grpc as pb_grpc

    metadata = []
    if args.token_file:
        metadata.append(("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"))
    request = pb.RecommendRequest(user_id=args.user, count=args.count, beam_width=args.beam_width)
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = pb_grpc.RecommenderStub(channel).Recommend(
                request, timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as e:
            console.print(f"[red]{e.code().name}:[/] {e.details()}")
            return 1
    items_path = Path(args.artifacts) / "data" / "items.parquet"
    about: dict[str, str] = {}
    if items_path.is_file():
        items = pd.read_parquet(items_path)
        label = items["title"].fillna("").astype(str)
        label = label.where(label != "", items["tag"].astype(str))
        about = dict(zip(items["item_id"].astype(str), label, strict=True))
    note = f", degraded: {reply.degraded}" if reply.degraded else ""
    table = Table(title=f"{args.user}: {reply.model_version}{note}")
    for col, justify in (
        ("#", "right"),
        ("item", "left"),
        ("score", "right"),
        ("SID", "left"),
        ("title / topic", "left"),
    ):
        table.add_column(col, justify=justify)
    for rank, item in enumerate(reply.items, 1):
        sid = "-".join(map(str, item.semantic_id))
        table.add_row(
            str(rank), item.item_id, f"{item.score:.3f}", sid, about.get(item.item_id, "")
        )
    console.print(table)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    """Show the live catalog, or publish a version with items added or removed."""
    directory = catalog_dir(args.repository)
    if args.catalog_command == "show":
        live = catalog.load(directory)
        console.print(
            f"catalog v{live.version}: {len(live.items.item_ids):,} items, "
            f"{len(live.trie):,} SIDs in {directory}"
        )
        return 0
    try:
        if args.catalog_command == "remove":
            change = partial(catalog.with_changes, remove_ids=args.item_ids)
        else:
            codes = tokenize_new_items(args.tokenizer, np.load(args.content))
            change = partial(catalog.with_changes, add_ids=args.item_ids, add_codes=codes)
        version, updated = catalog.update(directory, change)
    except (KeyError, ValueError) as err:
        console.print(f"[red]catalog unchanged:[/] {err}")
        return 2
    console.print(f"catalog v{version} live: {len(updated.item_ids):,} items")
    return 0


def _serving_pathways(artifacts: Path, cfg: OneRecConfig, users: int, seed: int) -> list:
    """Pathways of a seeded sample of users, as the front end builds them after their last
    event (the lifelong compression runs here, outside the timed loop)."""
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


def cmd_bench_triton(args: argparse.Namespace) -> int:
    """Latency and throughput through Triton per beam width and client concurrency."""
    from server import triton_bench
    from server.triton_client import probe, repository_config
    from server.triton_launcher import TritonProcess

    cfg = repository_config(args.repository)
    pathways = _serving_pathways(Path(args.artifacts), cfg, args.users, args.seed)
    process = None
    if args.url is None:
        process = TritonProcess(args.repository, probe=lambda url: probe(url, cfg)).start()
    url = args.url or process.grpc_url
    table = Table(title=f"Triton ensemble `onerec`, {args.requests} requests per row")
    cols = ("beam", "clients", "QPS", "p50 ms", "p99 ms", "batch enc", "batch dec", "errors")
    for col in cols:
        table.add_column(col, justify="right")
    try:
        for beam in args.beams:
            for clients in args.concurrency:
                row = triton_bench.run(url, pathways, beam, clients, args.requests)
                table.add_row(
                    str(beam),
                    str(clients),
                    f"{row.qps:.1f}",
                    f"{row.p50_ms:.1f}",
                    f"{row.p99_ms:.1f}",
                    f"{row.mean_batch['onerec_encoder']:.2f}",
                    f"{row.mean_batch['onerec_decoder']:.2f}",
                    str(row.errors),
                )
    finally:
        if process is not None:
            process.stop()
    console.print(table)
    return 0


def cmd_bench_pathways(args: argparse.Namespace) -> int:
    """Time the front end's pathway build per history length: store reads, then the
    lifelong compression (first call) or its cache (second call)."""
    import tempfile

    from server.feature_store import EventRow, SQLiteFeatureStore
    from server.pathway_builder import PathwayBuilder

    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(size=(args.items, 64)).astype(np.float32)
    cfg = OneRecConfig(n_items=args.items)
    table = Table(title="pathways of one request, SQLite feature store")
    for col in (
        "history",
        "store reads ms",
        "lifelong (cold) ms",
        "total cold ms",
        "total warm ms",
    ):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteFeatureStore(Path(tmp) / "bench.sqlite")
        for n in args.history:
            user = f"u{n}"
            items = rng.integers(0, args.items, n)
            store.append(
                user,
                (
                    EventRow(
                        f"i{i}",
                        int(i),
                        1_700_000_000_000 + t * 1000,
                        5000,
                        10000,
                        (True, t % 3 == 0, False, False, False, False),
                        t % 3 == 0,
                    )
                    for t, i in enumerate(items)
                ),
            )
            builder = PathwayBuilder(store, cfg, vectors)
            now = 1_700_000_000_000 + n * 1000 + 1
            started = time.perf_counter()
            cold = builder.build(user, now, np.zeros(0, np.int64))
            cold_s = time.perf_counter() - started
            warm = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                builder.build(user, now, np.zeros(0, np.int64))
                warm.append(time.perf_counter() - started)
            table.add_row(
                f"{n:,}",
                f"{cold.features_s * 1e3:.1f}",
                f"{cold.lifelong_s * 1e3:.1f}",
                f"{cold_s * 1e3:.1f}",
                f"{np.median(warm) * 1e3:.1f}",
            )
        store.close()
    console.print(table)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build the served artefacts from a data set")
    p.add_argument("--source", default="synthetic", help="'synthetic' or a path a loader reads")
    p.add_argument("--out", help="artefact directory (default artifacts/<name>)")
    p.add_argument("--force", action="store_true", help="rebuild even if artefacts exist")
    p.add_argument("--until", choices=STAGES, default="repository", help="last stage to build")
    p.add_argument("--repository", default=str(TEMPLATE), help="Triton model repository")
    _add_budget_knobs(p, TrainConfig())
    p.add_argument("--encoder-instances", type=int, default=1)
    p.add_argument("--decoder-instances", type=int, default=1)
    p.add_argument("--feature-store", help=STORE_HELP)
    _add_synthetic_knobs(p)
    _add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_build)

    features = sub.add_parser("features", help="the feature store").add_subparsers(
        dest="features_command", required=True
    )
    p = features.add_parser("load", help="load the build's users and events into a store")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--feature-store", help=f"{STORE_HELP}; default $ONEREC_FEATURE_STORE")
    p.add_argument("--force", action="store_true", help="replace the users a store holds")
    p.add_argument("--wait-s", type=float, default=120.0, help="wait this long for the store")
    p.set_defaults(func=cmd_features_load)

    data = sub.add_parser("data", help="make or convert data sets").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="generate the synthetic data set")
    p.add_argument("--out", required=True)
    _add_synthetic_knobs(p)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("load", help="read MovieLens, KuaiRand or a saved set; optionally save it")
    p.add_argument("source")
    p.add_argument("--out")
    p.set_defaults(func=cmd_data_load)

    p = sub.add_parser("tokenize", help="fit item embeddings and RQ-KMeans semantic IDs")
    p.add_argument("data", help="a data set directory or raw source")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    _add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_tokenize)

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train the OneRec model on a built artefact directory")
    p.add_argument("--artifacts", default="artifacts/synthetic")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    _add_budget_knobs(p, defaults)
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

    p = sub.add_parser("serve", help="the gRPC front end (and a local Triton)")
    p.add_argument("--artifacts", help="build artefacts (default artifacts/synthetic)")
    p.add_argument("--repository", help="Triton model repository (default model_repository)")
    p.add_argument("--triton-url", help="a running Triton's gRPC host:port; else start one")
    p.add_argument("--feature-store", help=STORE_HELP)
    p.add_argument("--port", type=int, help="gRPC port (default 50051)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 9464)")
    p.add_argument("--max-inflight", type=int, help="admission bound (default 64)")
    p.add_argument("--auth-token-file", help="require 'authorization: Bearer <token>'")
    p.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: measured)")
    p.add_argument("--max-count", type=int, help="most items per Recommend (default 100)")
    p.add_argument("--drain-s", type=float, help="NOT_SERVING this long before stopping (0)")
    p.add_argument("--grace-s", type=float, help="in-flight calls' time to finish (10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recommend", help="ask a running front end, print a table")
    p.add_argument("--user", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--beam-width", type=int, default=0, help="0 = the server's default")
    p.add_argument("--address", default=f"localhost:{os.environ.get('ONEREC_PORT', '50051')}")
    p.add_argument("--artifacts", default="artifacts/synthetic", help="for item titles/topics")
    p.add_argument("--token-file", help="bearer token, if the server requires one")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("triton", help="serve a model repository with the local tritonserver")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.add_argument("--http-port", type=int, help="default 8000 or $TRITON_HTTP_PORT")
    p.add_argument("--grpc-port", type=int, help="default 8001 or $TRITON_GRPC_PORT")
    p.add_argument("--metrics-port", type=int, help="default 8002 or $TRITON_METRICS_PORT")
    p.set_defaults(func=cmd_triton)

    cat = sub.add_parser("catalog", help="show or change the served catalog (no restart)")
    cat_sub = cat.add_subparsers(dest="catalog_command", required=True)
    p = cat_sub.add_parser("show", help="the live version")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.set_defaults(func=cmd_catalog)
    p = cat_sub.add_parser("remove", help="publish a version without these items")
    p.add_argument("item_ids", nargs="+")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.set_defaults(func=cmd_catalog)
    p = cat_sub.add_parser("add", help="tokenize new items with the saved codebooks, publish")
    p.add_argument("item_ids", nargs="+")
    p.add_argument("--content", required=True, help=".npy of the items' content vectors")
    p.add_argument("--tokenizer", default="artifacts/synthetic/tokenizer")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.set_defaults(func=cmd_catalog)

    bench = sub.add_parser("bench", help="printed benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    p = bench.add_parser("tokenizer", help="time RQ-KMeans on a synthetic catalog of N items")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--max-history", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    _add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_bench_tokenizer)
    p = bench.add_parser("triton", help="latency/QPS through Triton per beam width and clients")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.add_argument("--artifacts", default="artifacts/synthetic", help="data set for the users")
    p.add_argument("--url", help="a running Triton's gRPC host:port (default: start one)")
    p.add_argument("--beams", type=_ints, default=[64, 128, 256, 512])
    p.add_argument("--concurrency", type=_ints, default=[1, 8])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_triton)
    p = bench.add_parser("pathways", help="front-end pathway build time per history length")
    p.add_argument("--history", type=_ints, default=[100, 1_000, 10_000, 100_000])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_pathways)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except DataError as err:
        console.print(f"[red]data error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
