"""The ``onerec`` command line, one module per command group:

* :mod:`onerec.cli.build` -- ``build``, the offline pipeline from data to a served model;
* :mod:`onerec.cli.data` -- ``data synth|load`` and ``tokenize``;
* :mod:`onerec.cli.model` -- ``train``, ``eval`` and ``export`` (torch);
* :mod:`onerec.cli.align` -- ``reward``, the reward model (torch);
* :mod:`onerec.cli.serving` -- ``serve``, ``triton``, ``recommend``, ``catalog``, ``features``;
* :mod:`onerec.cli.bench` -- ``bench tokenizer|triton|pathways``.

Each command imports what it needs when it runs, so the serving commands work in an image
without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from onerec.cli import align, bench, build, data, model, serving
from onerec.cli.common import console
from onerec.data.schema import DataError

GROUPS = (build, data, model, align, serving, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
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
