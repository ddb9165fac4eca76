"""``onerec serve``, ``triton``, ``recommend``, ``catalog`` and ``features``: running and
operating the server. None of these imports torch: they run in the serving images."""

from __future__ import annotations

import argparse
import logging
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
from rich.table import Table

from onerec.cli.build import load_features
from onerec.cli.common import STORE_HELP, console
from onerec.runtime import catalog
from onerec.runtime.layout import TEMPLATE, catalog_dir


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
        "reward_selection",
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


def cmd_recommend(args: argparse.Namespace) -> int:
    """Call a running front end and print its answer as a table."""
    import grpc
    import pandas as pd

    from onerec.v1 import recommender_pb2 as pb
    from onerec.v1 import recommender_pb2_grpc as pb_grpc

    metadata = []
    if args.token_file:
        metadata.append(("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"))
    ranking = pb.Ranking.Value(f"RANKING_{args.ranking.upper()}")
    request = pb.RecommendRequest(
        user_id=args.user, count=args.count, beam_width=args.beam_width, ranking=ranking
    )
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
    note = f", ranked by {reply.ranking}"
    note += f", degraded: {reply.degraded}" if reply.degraded else ""
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
    from onerec.semantic_ids import tokenize_new_items

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
    load_features(Path(args.artifacts), Path(args.repository), store, args.force)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The serving and operating commands."""
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
    p.add_argument(
        "--reward-selection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="order answers by the reward model where there is one (default on)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recommend", help="ask a running front end, print a table")
    p.add_argument("--user", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--beam-width", type=int, default=0, help="0 = the server's default")
    p.add_argument(
        "--ranking",
        choices=("default", "reward", "generation"),
        default="default",
        help="order by the reward model, by the generator, or as the server is set",
    )
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

    features = sub.add_parser("features", help="the feature store").add_subparsers(
        dest="features_command", required=True
    )
    p = features.add_parser("load", help="load the build's users and events into a store")
    p.add_argument("--artifacts", default="artifacts/synthetic", help="the build's data set")
    p.add_argument("--repository", default=str(TEMPLATE), help="the served model repository")
    p.add_argument("--feature-store", help=f"{STORE_HELP}; default $ONEREC_FEATURE_STORE")
    p.add_argument("--force", action="store_true", help="replace the users a store holds")
    p.add_argument("--wait-s", type=float, default=120.0, help="wait this long for the store")
    p.set_defaults(func=cmd_features_load)
