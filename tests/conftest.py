"""Shared fixtures: the real public data sets, free ports, a real redis-server, and the
tiny served stack."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.net import free_ports

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


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Debian's redis-server. Where it is missing the tests that need it skip, except
    under CI=true, where .ci/run must have installed it."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary, tmp_path_factory):
    """A real redis-server (loadtest/redis_server.py) for the session."""
    from loadtest.redis_server import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


TINY_DATA = ["--users", "40", "--items", "700", "--max-history", "300", "--codebook-size", "16"]
TINY_SIZES = {"d_model": 32, "d_ff": 64, "d_expert": 64, "lifelong_len": 50, "positive_len": 32}
# A model small enough to train in seconds, for the trainer and the aligner's tests.
SMALL_MODEL = {
    "d_model": 32,
    "n_heads": 2,
    "d_ff": 64,
    "d_expert": 32,
    "positive_len": 32,
    "lifelong_len": 64,
    "n_queries": 8,
}


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A tiny randomly initialised model and reward model in a model repository, with its
    feature store, served by the real tritonserver on free ports for the whole session.

    Yields (TritonProcess, Dataset, OneRecConfig, repository, artefacts).
    """
    import torch

    from onerec.cli import main
    from onerec.experiment import load_item_tables
    from onerec.feature_load import load_store
    from onerec.repository import model_items, write_model_repository
    from onerec.reward import build_reward_model
    from onerec.semantic_ids import load_item_sids
    from onerec.train import build_model, model_config
    from onerec.train_config import RewardConfig
    from server.triton_client import probe
    from server.triton_launcher import TritonPorts, TritonProcess

    root = tmp_path_factory.mktemp("triton")
    art = root / "art"
    assert main(["build", "--out", str(art), "--until", "tokenizer", *TINY_DATA]) == 0
    ds, cat, _ = load_item_tables(art)
    cfg = model_config(ds, cat, 16, n_queries=8, **TINY_SIZES)
    torch.manual_seed(0)
    repo = root / "repo"
    model = build_model(cfg, cat).eval()
    reward = build_reward_model(ds, cat, 16, RewardConfig(d=16, hidden=32)).eval()
    items = load_item_sids(art / "tokenizer")
    write_model_repository(model, items, model_items(art), repo, reward=reward)
    (art / "model").mkdir()  # the same weights for in-process use (the bench's baseline)
    torch.save(
        {"model": model.state_dict(), "model_config": asdict(cfg)}, art / "model" / "checkpoint.pt"
    )
    load_store(ds, art / "features.sqlite", cat.vectors, cfg.lifelong_len)
    triton = TritonProcess(repo, TritonPorts(*free_ports(3)), probe=lambda url: probe(url, cfg))
    with triton:
        yield triton, ds, cfg, repo, art


SERVING = health_pb2.HealthCheckResponse.SERVING


class Server:
    """An `onerec serve` subprocess on free ports."""

    def __init__(
        self, served, tmp: Path, triton_url: str, *extra: str, store: Path | str | None = None
    ):
        _, _, _, repo, art = served
        self.port, self.metrics_port = free_ports(2)
        self.store = store or tmp / "features.sqlite"  # a path, or a redis:// URL
        if store is None:
            shutil.copy(art / "features.sqlite", self.store)
        argv = [sys.executable, "-m", "onerec", "serve", "--artifacts", str(art)]
        argv += ["--repository", str(repo), "--triton-url", triton_url]
        argv += ["--feature-store", str(self.store), "--port", str(self.port)]
        argv += ["--metrics-port", str(self.metrics_port), "--peak-flops", "1e11", *extra]
        self.log = open(tmp / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop
        env = dict(os.environ, ONEREC_PROBE_INTERVAL_S="0.5")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.address = f"127.0.0.1:{self.port}"

    def wait_health(self, want: int, channel: grpc.Channel, timeout: float = 90.0) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                got = stub.Check(
                    health_pb2.HealthCheckRequest(service="onerec.v1.Recommender"), timeout=2
                ).status
                if got == want:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"health never became {want}: {Path(self.log.name).read_text()[-3000:]}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()
