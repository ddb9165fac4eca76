"""Shared fixtures: where the real public data sets live, and how their absence is handled."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("ONEREC_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")
)


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/data/<name>``.

    CI (``CI=true``) must have the data beside the checkout, so absence fails there; on a
    developer machine without it the test is skipped with the reason.
    """
    path = (SHARED_DATA / name).resolve()
    if not path.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data set {path} is missing")
        pytest.skip(f"shared data set {path} is not present")
    return path


@pytest.fixture
def ml_latest_small() -> Path:
    return shared_dataset("ml-latest-small")


@pytest.fixture
def kuairand_sample() -> Path:
    return shared_dataset("kuairand-sample")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


TINY_DATA = ["--users", "40", "--items", "150", "--max-history", "300", "--codebook-size", "8"]
TINY_SIZES = {"d_model": 32, "d_ff": 64, "d_expert": 64, "lifelong_len": 50, "positive_len": 32}


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny randomly initialised model in a model repository, with its feature store,
    served by the real tritonserver on free ports for the whole session.

    Yields (TritonProcess, Dataset, OneRecConfig, repository, artefacts).
    """
    import torch

    from onerec.cli import main
    from onerec.experiment import load_catalog
    from onerec.repository import write_model_repository
    from onerec.semantic_ids import load_item_sids
    from onerec.train import build_model, model_config
    from server.feature_store import load_dataset
    from server.triton_client import probe
    from server.triton_launcher import TritonPorts, TritonProcess

    root = tmp_path_factory.mktemp("triton")
    art = root / "art"
    assert main(["build", "--out", str(art), "--until", "tokenizer", *TINY_DATA]) == 0
    ds, cat, _ = load_catalog(art)
    cfg = model_config(ds, cat, 8, n_queries=8, **TINY_SIZES)
    torch.manual_seed(0)
    repo = root / "repo"
    write_model_repository(build_model(cfg, cat).eval(), load_item_sids(art / "tokenizer"), repo)
    load_dataset(ds, art / "features.sqlite").close()
    triton = TritonProcess(repo, TritonPorts(*free_ports(3)), probe=lambda url: probe(url, cfg))
    with triton:
        yield triton, ds, cfg, repo, art
