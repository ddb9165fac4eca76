"""``onerec data`` and ``onerec tokenize``: make, convert and tokenize data sets."""

from __future__ import annotations

import argparse
import time

from onerec.cli.common import (
    add_synthetic_knobs,
    add_tokenizer_knobs,
    console,
    print_dataset,
    print_tokenizer,
    synthetic_config,
    tokenizer_config,
)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from onerec.data.synthetic import generate

    started = time.perf_counter()
    ds = generate(synthetic_config(args), progress=True)
    ds.save(args.out)
    print_dataset(ds)
    console.print(f"written to {args.out} in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_data_load(args: argparse.Namespace) -> int:
    from onerec.data.loaders import load_source

    ds = load_source(args.source)
    if args.out:
        ds.save(args.out)
    print_dataset(ds)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from onerec.data.loaders import load_source
    from onerec.semantic_ids import tokenize_dataset

    ds = load_source(args.data)
    stats = tokenize_dataset(ds, args.out, tokenizer_config(args))
    print_tokenizer(stats)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``onerec data synth|load`` and ``onerec tokenize``."""
    data = sub.add_parser("data", help="make or convert data sets").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("synth", help="generate the synthetic data set")
    p.add_argument("--out", required=True)
    add_synthetic_knobs(p)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("load", help="read MovieLens, KuaiRand or a saved set; optionally save it")
    p.add_argument("source")
    p.add_argument("--out")
    p.set_defaults(func=cmd_data_load)

    p = sub.add_parser("tokenize", help="fit item embeddings and RQ-KMeans semantic IDs")
    p.add_argument("data", help="a data set directory or raw source")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    add_tokenizer_knobs(p)
    p.set_defaults(func=cmd_tokenize)
