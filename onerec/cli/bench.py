"""``onerec bench``: printed benchmarks of the tokenizer, Triton and the pathway build."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from onerec.cli.common import (
    add_tokenizer_knobs,
    console,
    ints,
    print_tokenizer,
    serving_pathways,
    tokenizer_config,
)
from onerec.runtime.config import OneRecConfig
from onerec.runtime.layout import TEMPLATE


def cmd_bench_tokenizer(args: argparse.Namespace) -> int:
    """Printed, not asserted: embeddings and RQ-KMeans for a synthetic catalog of N items."""
    from onerec.data.synthetic import SyntheticConfig, generate
    from onerec.embeddings import item_embeddings
    from onerec.tokenizer import SemanticTokenizer, collision_stats

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
    cfg = tokenizer_config(args)
    started = time.perf_counter()
    tokenizer, codes, stats = SemanticTokenizer.fit(x, cfg)
    k = tokenizer.config.codebook_size
    stats["seconds"] = time.perf_counter() - started
    stats.update(collision_stats(codes))
    print_tokenizer(stats)
    console.print(
        f"{len(ds.events):,} events: data {data_s:.1f}s, embeddings {embed_s:.1f}s; "
        f"tokenizer for {args.items:,} items x {x.shape[1]} dims, K={k}: "
        f"[bold]{stats['seconds']:.1f}s[/]"
    )
    return 0


def cmd_bench_triton(args: argparse.Namespace) -> int:
    """Latency and throughput through Triton per beam width and client concurrency."""
    from server import triton_bench
    from server.triton_client import probe, repository_config
    from server.triton_launcher import TritonProcess

    cfg = repository_config(args.repository)
    pathways = serving_pathways(Path(args.artifacts), cfg, args.users, args.seed)
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
    """Time the front end's pathway build per history length: the lifelong compression
    (background work), then a request's store reads and record read (first call) or its
    cache (later calls)."""
    import tempfile

    from server.feature_store import EventRow, SQLiteFeatureStore
    from server.pathway_builder import PathwayBuilder

    rng = np.random.default_rng(args.seed)
    vectors = rng.normal(size=(args.items, 64)).astype(np.float32)
    cfg = OneRecConfig(n_items=args.items)
    table = Table(title="pathways of one request, SQLite feature store")
    for col in (
        "history",
        "compression (background) ms",
        "store reads ms",
        "lifelong record (cold) ms",
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
            started = time.perf_counter()
            builder.refresher.refresh(user)  # what the build and LogEvents do off the path
            compress_s = time.perf_counter() - started
            now = 1_700_000_000_000 + n * 1000 + 1
            started = time.perf_counter()
            cold = builder.build(user, now, np.zeros(0, np.int64))
            cold_s = time.perf_counter() - started
            warm = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                builder.build(user, now, np.zeros(0, np.int64))
                warm.append(time.perf_counter() - started)
            builder.refresher.close()
            table.add_row(
                f"{n:,}",
                f"{compress_s * 1e3:.1f}",
                f"{cold.features_s * 1e3:.1f}",
                f"{cold.lifelong_s * 1e3:.1f}",
                f"{cold_s * 1e3:.1f}",
                f"{np.median(warm) * 1e3:.1f}",
            )
        store.close()
    console.print(table)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec bench tokenizer|triton|pathways``."""
    bench = sub.add_parser("bench", help="printed benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    p = bench.add_parser("tokenizer", help="time RQ-KMeans on a synthetic catalog of N items")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--max-history", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_bench_tokenizer)
    p = bench.add_parser("triton", help="latency/QPS through Triton per beam width and clients")
    p.add_argument("--repository", default=str(TEMPLATE))
    p.add_argument("--artifacts", default="artifacts/synthetic", help="data set for the users")
    p.add_argument("--url", help="a running Triton's gRPC host:port (default: start one)")
    p.add_argument("--beams", type=ints, default=[64, 128, 256, 512])
    p.add_argument("--concurrency", type=ints, default=[1, 8])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_triton)
    p = bench.add_parser("pathways", help="front-end pathway build time per history length")
    p.add_argument("--history", type=ints, default=[100, 1_000, 10_000, 100_000])
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_pathways)
