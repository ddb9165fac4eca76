"""`make bench`: the serving stack against the naive baseline, same run, same weights.

First the **baseline**, :class:`onerec.naive_serving.NaiveServing` in this process with
the machine to itself: one request at a time, with the same pathways from the same
feature store. Then it brings up Triton and the front end (its own ports) and measures
over gRPC:

* **server sweep**: closed loop, concurrency 1..32, beam 128: QPS, p50/p95/p99, MFU,
  Triton's queue/compute split per request and the batch size each model saw, the front
  end's per-stage latency, and its own ``onerec_qps``/``onerec_mfu`` read from Prometheus
  at the end of the level, checked against the harness's numbers (within 20%);
* **matched load**: an open loop at the baseline's own QPS, for the p99 ratio;
* **half-peak**: an open loop paced at half the best QPS, latency counted from each
  request's scheduled send time (no coordinated omission);
* **beam sweep**: 64..512 beams at a fixed concurrency;
* **lifelong sweep**: users with about 100..100,000 events, at concurrency 1: each one's
  first call, then warm calls interleaved across the users;
* **reward selection**: at beam 128, concurrency 1 and the peak, the generator's order
  beside the reward model's: QPS, p50/p99, and the reward stage's latency and share of
  the model time;
* **feature stores**: the same Triton behind a front end on SQLite, then on a real
  ``redis-server`` (Debian's package; skipped where it is missing), Recommend QPS and
  p99 at concurrency 1 and at the server's peak, and LogEvents' durable-write latency;
* **batch-delay sweep**: Triton's ``max_queue_delay_microseconds`` for both models,
  changed through its repository API (a reload, no restart), at a fixed concurrency.

Every sweep but the reward-selection one asks for the generator's order
(``RANKING_GENERATION``): the harness counts the generator's FLOPs itself, which the
server's own MFU is checked against, and the numbers stay comparable across runs.

MFU = model FLOPs of the completed requests (``onerec.runtime.pathways.request_flops``: each
request at its own pathway lengths, as the server counts them; checked against
FlopCounterMode in the tests) per second, over the best of a few float32 GEMMs measured
here. Everything runs on one machine: the
load generator, the front end and Triton share its cores, which the report states next to
the numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import torch
import tritonclient.grpc as grpcclient

from loadtest import cpu
from loadtest.net import free_ports, scrape
from loadtest.pacing import on_schedule
from onerec.experiment import load_item_tables, load_served_model
from onerec.naive_serving import NaiveServing
from onerec.runtime.layout import REWARD, REWARD_ONNX
from onerec.runtime.pathways import request_flops
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.feature_store import SQLiteFeatureStore
from server.metrics import STAGES, measure_peak_flops
from server.pathway_builder import PathwayBuilder
from server.triton_client import probe, repository_config
from server.triton_launcher import TritonPorts, TritonProcess

MODELS = ("onerec_encoder", "onerec_decoder")
VERDICT = {True: "agree", False: "DISAGREE", None: "not checked: levels under the 10 s window"}
GC_COLS = ["full_collections", "pause_ms", "bench_full_collections", "bench_pause_ms"]
BEAM_COLS = ["beam_width", "qps", "p50_ms", "p99_ms", "mfu", "c1_p50_ms", "c1_p99_ms"]
LIFELONG_COLS = ["history", "user_history", "first_call_ms", "p50_ms", "p99_ms"]
STORE_COLS = ["store", "concurrency", "qps", "p50_ms", "p95_ms", "p99_ms"]
REWARD_COLS = [
    "ranking",
    "concurrency",
    "qps",
    "p50_ms",
    "p99_ms",
    "triton_ms",
    "reward_ms",
    "reward_p99_ms",
    "reward_share",
    "prom_mfu",
]
DELAY_COLS = ["max_queue_delay_us", "qps", "p50_ms", "p99_ms", "avg_batch_decoder"]


def _model_value(m: dict, name: str, model: str) -> float:
    return sum(v for (n, labels), v in m.items() if n == name and ("model", model) in labels)


class FrontProcess:
    """An `onerec serve` front end on free ports against a running Triton, on the feature
    store ``store`` (a SQLite path or a redis:// URL); stopped on exit."""

    def __init__(
        self, artifacts: Path, repository: Path, peak: float, triton_url: str, store: str, log: Path
    ) -> None:
        self.port, self.metrics_port = free_ports(2)
        self.argv = [sys.executable, "-m", "onerec", "serve", "--artifacts", str(artifacts)]
        self.argv += ["--repository", str(repository), "--feature-store", store]
        self.argv += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        self.argv += ["--peak-flops", str(peak), "--max-inflight", "256"]
        self.argv += ["--triton-url", triton_url]
        self.log = log

    def __enter__(self) -> FrontProcess:
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.stub.Recommend(pb.RecommendRequest(user_id="warm-up"), timeout=5)
                return self
            except grpc.RpcError as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    tail = self.log.read_text()[-2000:]
                    raise RuntimeError(f"front end did not start: {tail}") from e
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


class Stack:
    """Triton and an `onerec serve` front end on free ports; stopped on exit."""

    def __init__(self, artifacts: Path, repository: Path, peak: float, workdir: Path) -> None:
        cfg = repository_config(repository)
        self.triton = TritonProcess(
            repository, TritonPorts(*free_ports(3)), probe=lambda u: probe(u, cfg)
        )
        self.artifacts, self.repository, self.peak = artifacts, repository, peak
        self.workdir = workdir
        self.store = workdir / "features.sqlite"
        shutil.copy(artifacts / "features.sqlite", self.store)  # load must not touch the build

    def front_end(self, store: str, name: str) -> FrontProcess:
        """Another front end on this Triton, on ``store``."""
        log = self.workdir / f"{name}.log"
        return FrontProcess(
            self.artifacts, self.repository, self.peak, self.triton.grpc_url, store, log
        )

    def __enter__(self) -> Stack:
        self.triton.start()
        try:
            self.front = self.front_end(str(self.store), "front").__enter__()
        except BaseException:
            self.triton.stop()
            raise
        self.stub, self.metrics_port = self.front.stub, self.front.metrics_port
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.front.__exit__()
        finally:
            self.triton.stop()


@dataclass
class Level:
    latencies: np.ndarray  # seconds, of the model's answers
    wall: float
    flops: float | None  # None where the harness does not count them (open loops)
    errors: int  # failed calls and fallback answers
    fallbacks: int = 0  # of which fallbacks: answers the server's own QPS counts


def user_flops(builder: PathwayBuilder, users: list[str], cfg, beams: list[int]) -> list[dict]:
    """Each user's model FLOPs per beam width, from the pathways the front end builds
    (``onerec.runtime.pathways.request_flops``, as the server counts them); this also warms
    ``builder``'s lifelong cache, as the server's is warmed."""
    out = []
    for user in users:
        p = builder.build(user, int(time.time() * 1000), builder.store.static(user)).pathways
        out.append({beam: request_flops(cfg, beam, p) for beam in beams})
    return out


def closed_loop(
    stub,
    users,
    flops_of,
    beam: int,
    clients: int,
    seconds: float,
    ranking: int = pb.RANKING_GENERATION,
) -> Level:
    """``clients`` threads, each sending its next request as soon as the last returns.
    The generator's order by default: its FLOPs are what ``flops_of`` counts."""
    lat: list[float] = []
    flops, errors, fallbacks = [0.0], [0], [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.perf_counter() < stop_at:
            u = int(rng.integers(len(users)))
            started = time.perf_counter()
            try:
                request = pb.RecommendRequest(user_id=users[u], beam_width=beam, ranking=ranking)
                reply = stub.Recommend(request, timeout=30)
            except grpc.RpcError:
                reply = None
            if reply is None or reply.degraded:  # a failure or a fallback: not the model
                with lock:
                    errors[0] += 1
                    fallbacks[0] += reply is not None
                continue
            elapsed = time.perf_counter() - started
            with lock:
                lat.append(elapsed)
                flops[0] += flops_of[u][beam]

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return Level(np.array(lat), wall, flops[0], errors[0], fallbacks[0])


def open_loop(stub, users, beam: int, rate: float, seconds: float) -> Level:
    """Requests sent on a fixed schedule (:func:`loadtest.pacing.on_schedule`); latency
    counts from the scheduled time."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def call(due: float, rng: np.random.Generator) -> None:
        user = users[int(rng.integers(len(users)))]
        try:
            request = pb.RecommendRequest(
                user_id=user, beam_width=beam, ranking=pb.RANKING_GENERATION
            )
            reply = stub.Recommend(request, timeout=30)
        except grpc.RpcError:
            reply = None
        with lock:
            if reply is None or reply.degraded:
                errors[0] += 1
            else:
                lat.append(time.monotonic() - due)

    start, end = on_schedule(rate, seconds, call)
    return Level(np.array(lat), end - start, None, errors[0])


def _row(level: Level, peak: float) -> dict:
    """A level's numbers; None (JSON null) where no request succeeded."""
    ms = level.latencies * 1000
    pct = [float(v) for v in np.percentile(ms, [50, 95, 99])] if len(ms) else [None] * 3
    return {
        "qps": len(ms) / level.wall,
        "p50_ms": pct[0],
        "p95_ms": pct[1],
        "p99_ms": pct[2],
        "mfu": None if level.flops is None else level.flops / level.wall / peak,
        "requests": len(ms),
        "errors_or_fallbacks": level.errors,
        "answered_qps": (len(ms) + level.fallbacks) / level.wall,  # what onerec_qps counts
    }


def triton_split(before: dict, after: dict) -> dict:
    """Per model: average batch, and queue/compute microseconds per request."""
    out = {}
    for model in MODELS:
        d = {
            k: _model_value(after, k, model) - _model_value(before, k, model)
            for k in (
                "nv_inference_count",
                "nv_inference_exec_count",
                "nv_inference_request_success",
                "nv_inference_queue_duration_us",
                "nv_inference_compute_infer_duration_us",
            )
        }
        requests = max(d["nv_inference_request_success"], 1)
        out[model] = {
            "avg_batch": d["nv_inference_count"] / max(d["nv_inference_exec_count"], 1),
            "queue_us_per_request": d["nv_inference_queue_duration_us"] / requests,
            "compute_us_per_request": d["nv_inference_compute_infer_duration_us"] / requests,
        }
    return out


def stage_split(before: dict, after: dict) -> dict[str, float]:
    """The front end's mean milliseconds per Recommend in each stage over the interval."""
    out = {}
    for stage in STAGES:
        key = (("stage", stage),)
        n = after.get(("onerec_stage_latency_seconds_count", key), 0.0) - before.get(
            ("onerec_stage_latency_seconds_count", key), 0.0
        )
        total = after.get(("onerec_stage_latency_seconds_sum", key), 0.0) - before.get(
            ("onerec_stage_latency_seconds_sum", key), 0.0
        )
        out[stage] = 1000 * total / n if n else None
    return out


def stage_p99(before: dict, after: dict) -> dict[str, float | None]:
    """Each stage's p99 over the interval, read off the histogram's buckets (the bucket's
    upper bound): where the tail of a level's latency is spent."""
    out = {}
    for stage in STAGES:
        counts = {}
        for (name, labels), value in after.items():
            labels = dict(labels)
            if name == "onerec_stage_latency_seconds_bucket" and labels.get("stage") == stage:
                le = float(labels["le"])
                counts[le] = value - before.get((name, tuple(sorted(labels.items()))), 0.0)
        total = counts.get(float("inf"), 0.0)
        bound = next((le for le in sorted(counts) if total and counts[le] >= 0.99 * total), None)
        out[stage] = None if bound is None or bound == float("inf") else 1000 * bound
    return out


class GcPauses:
    """This process's full collections since the last ``take``."""

    def __init__(self) -> None:
        self._started, self.count, self.total = 0.0, 0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.total += time.perf_counter() - self._started

    def take(self) -> dict[str, float]:
        out = {"bench_full_collections": self.count, "bench_pause_ms": 1000 * self.total}
        self.count, self.total = 0, 0.0
        return out


def gc_split(before: dict, after: dict) -> dict[str, float]:
    """The front end's full (generation 2) garbage collections over the interval: how
    many, and their total and mean pause."""
    key = (("generation", "2"),)
    count = after.get(("onerec_gc_pause_seconds_count", key), 0.0)
    count -= before.get(("onerec_gc_pause_seconds_count", key), 0.0)
    total = after.get(("onerec_gc_pause_seconds_sum", key), 0.0)
    total -= before.get(("onerec_gc_pause_seconds_sum", key), 0.0)
    return {"full_collections": count, "pause_ms": 1000 * total}


def agreement(
    rows: list[dict], illegal: float, level_s: float, window_s: float = 10.0, tolerance=0.2
) -> dict:
    """The server's own ``onerec_qps``/``onerec_mfu`` (read at the end of each level)
    against the harness's count for that level. Their 10 s window must fit in a level;
    a shorter level is reported unchecked (``agree`` None), not as a disagreement.
    ``illegal`` is ``onerec_illegal_items_total`` at the end of the whole run."""

    def rel(a: float, b: float) -> float:
        return abs(a - b) / b if b else math.inf

    qps_err = max(rel(r["prom_qps"], r["answered_qps"]) for r in rows)
    mfu_err = max(rel(r["prom_mfu"], r["mfu"]) for r in rows)
    agree = qps_err <= tolerance and mfu_err <= tolerance and illegal == 0
    return {
        "max_qps_rel_err": qps_err,
        "max_mfu_rel_err": mfu_err,
        "illegal_items_total": illegal,
        "tolerance": tolerance,
        "agree": agree if level_s >= window_s else None,
    }


def set_queue_delay(url: str, delay_us: int) -> None:
    """Reload both models with another ``max_queue_delay_microseconds`` (repository API)."""
    with grpcclient.InferenceServerClient(url) as client:
        for model in MODELS:
            config = client.get_model_config(model, as_json=True)["config"]
            config["dynamic_batching"]["max_queue_delay_microseconds"] = str(delay_us)
            client.load_model(model, config=json.dumps(config))
        for model in (*MODELS, "onerec"):
            if not client.is_model_ready(model):
                raise RuntimeError(f"{model} not ready after the reload")


def warm(stub, users: list[str], timeout_s: float = 60.0) -> None:
    """Until the model answers again (the front end's probe may have seen a reload),
    then a few requests to warm the new ONNX sessions."""
    deadline = time.monotonic() + timeout_s
    while stub.Recommend(pb.RecommendRequest(user_id=users[0]), timeout=30).degraded:
        if time.monotonic() > deadline:
            raise RuntimeError("the model did not answer again after the reload")
        time.sleep(0.5)
    for user in users[:10]:
        stub.Recommend(pb.RecommendRequest(user_id=user), timeout=30)


BASELINE_WARMUP = 10  # untimed first requests: torch's first calls, as the server is warmed


def baseline_rows(naive: NaiveServing, builder: PathwayBuilder, users, flops_of, beam, n):
    """The naive server, one request at a time, timed like the server (features included),
    after ``BASELINE_WARMUP`` untimed requests."""
    rng = np.random.default_rng(1)

    def serve() -> int:
        u = int(rng.integers(len(users)))
        built = builder.build(users[u], int(time.time() * 1000), builder.store.static(users[u]))
        naive.recommend(built.pathways, beam)
        return u

    for _ in range(BASELINE_WARMUP):
        serve()
    lat, flops = [], 0.0
    started_all = time.perf_counter()
    for _ in range(n):
        started = time.perf_counter()
        u = serve()
        lat.append(time.perf_counter() - started)
        flops += flops_of[u][beam]
    return Level(np.array(lat), time.perf_counter() - started_all, flops, 0)


def log_events_latency(stub, users: list[str], items: list[str], n: int) -> dict:
    """``n`` LogEvents of one event each, one at a time: how long an acknowledged (durable)
    write takes."""
    rng = np.random.default_rng(2)
    lat = []
    for i in range(n):
        event = pb.Event(
            item_id=items[int(rng.integers(len(items)))],
            timestamp_ms=int(time.time() * 1000),
            watch_ms=5_000,
            click=True,
        )
        request = pb.LogEventsRequest(
            user_id=users[int(rng.integers(len(users)))], events=[event], request_id=f"bench-{i}"
        )
        started = time.perf_counter()
        stub.LogEvents(request, timeout=10)
        lat.append(time.perf_counter() - started)
    ms = np.array(lat) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def store_sweep(stack: Stack, users, flops_of, clients: list[int], seconds: float) -> dict:
    """The same Triton and weights behind a front end on each feature store, back to back:
    Recommend QPS and latency per concurrency, then LogEvents' write latency. Redis runs
    with ``appendfsync always`` and SQLite with ``synchronous=FULL``: both durable."""
    from loadtest.redis_server import RedisServer
    from onerec.cli.build import load_features
    from onerec.data.schema import Dataset

    workdir = stack.workdir / "stores"
    workdir.mkdir()
    try:
        redis = RedisServer(workdir).start()
    except FileNotFoundError as e:
        return {"rows": [], "log_events": {}, "skipped": str(e)}
    rows, writes = [], {}
    try:
        ds = Dataset.load(stack.artifacts / "data")
        load_features(stack.artifacts, stack.repository, redis.url(), force=True)
        sqlite = workdir / "features.sqlite"
        shutil.copy(stack.artifacts / "features.sqlite", sqlite)
        items = ds.items["item_id"].astype(str).tolist()
        for name, store in (("sqlite", str(sqlite)), ("redis", redis.url())):
            with stack.front_end(store, f"front-{name}") as front:
                for u in users:  # the lifelong caches, as the main sweep had them
                    front.stub.Recommend(pb.RecommendRequest(user_id=u, count=1), timeout=60)
                for c in clients:
                    level = closed_loop(front.stub, users, flops_of, 128, c, seconds)
                    rows.append({"store": name, "concurrency": c, **_row(level, stack.peak)})
                    print(f"store {name} c={c}: {rows[-1]['qps']:.1f} QPS", flush=True)
                writes[name] = log_events_latency(front.stub, users, items, 200)
    finally:
        redis.stop()
    return {"rows": rows, "log_events": writes}


def lifelong_sweep(
    stub: pb_grpc.RecommenderStub, users: dict[int, str], lengths: pd.Series, requests: int
) -> list[dict]:
    """One user per history length, at concurrency 1: the first call, then ``requests``
    warm ones taken in turns across the users, so that a slow spell of the shared machine
    lands on every length alike (a p99 needs on the order of 100 calls to be more than the
    slowest one)."""

    def call(user: str) -> float:
        started = time.perf_counter()
        request = pb.RecommendRequest(user_id=user, ranking=pb.RANKING_GENERATION)
        stub.Recommend(request, timeout=60)
        return (time.perf_counter() - started) * 1000

    first = {n: call(user) for n, user in users.items()}
    warm: dict[int, list[float]] = {n: [] for n in users}
    for _ in range(requests):
        for n, user in users.items():
            warm[n].append(call(user))
    return [
        {
            "history": n,
            "user_history": int(lengths[user]),
            "first_call_ms": first[n],
            "p50_ms": float(np.percentile(warm[n], 50)),
            "p99_ms": float(np.percentile(warm[n], 99)),
        }
        for n, user in users.items()
    ]


def reward_selection(stack: Stack, users, flops_of, clients: list[int], seconds: float) -> dict:
    """Reward selection's cost: at beam 128, per concurrency, the generator's order and
    the reward model's, one after the other on the same stack. The reward model's share
    of a request's model time is its stage over the Triton and reward stages together;
    MFU with it is the server's own (the harness cannot count the candidates it scores)."""
    if not (stack.repository / REWARD / "1" / REWARD_ONNX).is_file():
        return {"skipped": "the model repository has no reward model"}
    rows = []
    for c in clients:
        for name, ranking in (("generation", pb.RANKING_GENERATION), ("reward", pb.RANKING_REWARD)):
            before = scrape(stack.metrics_port)
            level = closed_loop(stack.stub, users, flops_of, 128, c, seconds, ranking)
            after = scrape(stack.metrics_port)
            mean, p99 = stage_split(before, after), stage_p99(before, after)
            model_ms = (mean["triton"] or 0.0) + (mean["reward"] or 0.0)
            row = {"ranking": name, "concurrency": c, **_row(level, stack.peak)}
            row |= {"triton_ms": mean["triton"], "reward_ms": mean["reward"]}
            row |= {"reward_p99_ms": p99["reward"], "prom_mfu": after[("onerec_mfu", ())]}
            row["reward_share"] = (mean["reward"] or 0.0) / model_ms if model_ms else None
            rows.append(row)
            print(f"{name} c={c}: {row['qps']:.1f} QPS p99 {row['p99_ms']:.1f} ms", flush=True)
    return {"rows": rows}


def topup_rates(repository: Path, builder: PathwayBuilder, users: list[str]) -> dict:
    """The share of answers that the popularity top-up must complete (the search left
    fewer than ``count`` allowed items), for ``users``, offline with the served graphs and
    the front end's own mapping: excluding in the search only the short-term and positive
    pathways' items (the rule before) against every seen item the record holds (now)."""
    from onerec.runtime.beam_search import constrained_beam_search, exclude_leaves
    from onerec.runtime.layout import DECODER, ENCODER, ITEM_TABLE, MODEL_ITEMS, catalog_dir
    from onerec.runtime.model_items import ModelItems
    from onerec.runtime.onnx_runners import OnnxDecoder, OnnxEncoder
    from onerec.runtime.pathways import collate
    from server.catalog import CatalogReader

    enc_dir = repository / ENCODER / "1"
    encoder, decoder = (
        OnnxEncoder(enc_dir / "encoder.onnx", 1),
        OnnxDecoder(repository / DECODER / "1", 1),
    )
    items = ModelItems.load(enc_dir / MODEL_ITEMS)
    view = CatalogReader(
        catalog_dir(repository), items.index(), np.load(enc_dir / ITEM_TABLE)
    ).get()
    trie = view.index.trie
    topped = {"recent": 0, "seen": 0}
    for user in users:
        built = builder.build(user, int(time.time() * 1000), builder.store.static(user))
        keep, kv, vec = encoder.encode(collate([built.pathways]))
        p = built.pathways
        recent = np.concatenate([p["short_items"], p["pos_items"]]) - 1
        for rule, avoid in (("recent", recent), ("seen", built.seen)):
            exclude = exclude_leaves(trie, [view.exclusion_sids(view.rows_of_model(avoid))])
            found = constrained_beam_search(decoder.search(keep, kv), 1, 128, trie, exclude)
            rows, _, _ = view.rank(found.sids[0], found.scores[0], vec[0], built.seen, [], 10)
            topped[rule] += len(rows) < 10
    n = max(len(users), 1)
    return {"users": len(users), "before": topped["recent"] / n, "after": topped["seen"] / n}


def history_lengths(store_path: Path) -> pd.Series:
    import sqlite3

    with sqlite3.connect(store_path) as conn:
        rows = conn.execute("SELECT user_id, n_events FROM versions").fetchall()
    return pd.Series(dict(rows), dtype=np.int64)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("server", "o-"), ("baseline", "s--")):
        rows = report[key]
        ax.plot([r["qps"] for r in rows], [r["p99_ms"] for r in rows], style, label=f"{key} p99")
        ax.plot(
            [r["qps"] for r in rows],
            [r["p50_ms"] for r in rows],
            style,
            alpha=0.4,
            label=f"{key} p50",
        )
    ax.set(xlabel="QPS", ylabel="latency (ms)", yscale="log", title="latency vs QPS, beam 128")
    ax.legend()
    paths.append(out / "bench_latency_qps.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = report["beam_sweep"]
    ax.plot([r["beam_width"] for r in rows], [r["p99_ms"] for r in rows], "o-", label="p99")
    ax.plot([r["beam_width"] for r in rows], [r["p50_ms"] for r in rows], "o--", label="p50")
    ax.set(xlabel="beam width", ylabel="latency (ms)", xscale="log", title="latency vs beam")
    ax.legend()
    paths.append(out / "bench_latency_beam.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def markdown(r: dict) -> str:
    def table(rows, cols):
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        return head + "".join(
            "| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |\n" for row in rows
        )

    cols = ["concurrency", "qps", "p50_ms", "p95_ms", "p99_ms", "mfu", "prom_qps", "prom_mfu"]

    def flat(key: str) -> list[dict]:
        return [
            {"concurrency": row["concurrency"]}
            | {f"{m}.{k}": v for m, d in row[key].items() for k, v in d.items()}
            if key == "triton"
            else {"concurrency": row["concurrency"], **row[key]}
            for row in r["server"]
        ]

    split_rows, stage_rows = flat("triton"), flat("stages_ms")
    split_cols = list(split_rows[0]) if split_rows else []
    cpu_rows = [
        {"concurrency": row["concurrency"], **row.get("cpu_cores", {})} for row in r["server"]
    ]
    cpu_cols = list(dict.fromkeys(k for row in cpu_rows for k in row))
    s, prom = r["summary"], r["prometheus"]
    return (
        f"# Benchmark\n\n{r['machine']}\n\nPeak {r['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"(best float32 GEMM). Load generator, front end and Triton share these cores.\n\n"
        f"## Summary\n\n"
        f"- throughput: server {s['server_peak_qps']:.1f} QPS (concurrency "
        f"{s['server_peak_concurrency']}) vs baseline {s['baseline_qps']:.2f} QPS: "
        f"**{s['throughput_ratio']:.1f}x**; server p99 there {_fmt(s['server_peak_p99_ms'])} "
        f"ms vs baseline p99 {_fmt(s['baseline_p99_ms'])} ms\n"
        f"- p99 at matched load (open loop at the baseline's {s['baseline_qps']:.2f} QPS): "
        f"server {_fmt(s['matched_p99_ms'])} ms vs baseline {_fmt(s['baseline_p99_ms'])} ms: "
        f"**{_fmt(s['p99_ratio'])}x**\n"
        f"- p99 at half of peak ({s['half_peak_qps']:.1f} QPS offered, open loop): "
        f"**{_fmt(s['half_peak_p99_ms'])} ms**\n"
        f"- MFU at saturation: {s['mfu_at_peak']:.2e} = model FLOPs of the answered requests "
        f"(each at its own pathway lengths) per second / peak\n"
        f"- Prometheus vs harness: QPS within {prom['max_qps_rel_err']:.1%}, MFU within "
        f"{prom['max_mfu_rel_err']:.1%} (tolerance {prom['tolerance']:.0%}), "
        f"`onerec_illegal_items_total` {prom['illegal_items_total']:.0f} over the whole run: "
        f"**{VERDICT[prom['agree']]}**\n\n"
        f"## Server (beam 128, closed loop)\n\n{table(r['server'], cols)}\n"
        f"## Front end per stage (mean ms per request)\n\n"
        f"{table(stage_rows, ['concurrency', *STAGES])}\n"
        f"## Front end per stage, p99 (ms, the histogram bucket's upper bound)\n\n"
        f"{table(flat('stages_p99_ms'), ['concurrency', *STAGES])}\n"
        f"## Full garbage collections per level (front end; this load generator)\n\n"
        f"{table(flat('gc'), ['concurrency', *GC_COLS])}\n"
        f"## Triton per model (avg batch, µs per request)\n\n{table(split_rows, split_cols)}\n"
        f"## Cores busy by process (only the model stubs' ONNX Runtime time does model "
        f"FLOPs)\n\n{table(cpu_rows, cpu_cols)}\n"
        f"## Baseline (torch eager, encoder every step, per-beam Python trie)\n\n"
        f"{table(r['baseline'], cols[:6])}\n"
        f"## Beam sweep (concurrency {r['beam_concurrency']})\n\n"
        f"{table(r['beam_sweep'], BEAM_COLS)}\n"
        f"## Popularity top-up, users with more than 1,000 events\n\n"
        f"Share of {r['topup']['users']} users' answers (count 10, beam 128) the top-up had to "
        f"complete: excluding only the short-term and positive items in the search "
        f"{r['topup']['before']:.1%}, excluding every seen item {r['topup']['after']:.1%}.\n\n"
        f"## Lifelong history sweep\n\n"
        f"{table(r['lifelong_sweep'], LIFELONG_COLS)}\n"
        f"## Triton batch delay (concurrency {r['beam_concurrency']}, beam 128)\n\n"
        f"{table(r['delay_sweep'], DELAY_COLS)}\n"
        f"{reward_markdown(r['reward_selection'], table)}"
        f"{store_markdown(r['store_sweep'], table)}"
    )


def reward_markdown(section: dict, table) -> str:
    head = "## Reward selection (beam 128, closed loop)\n\n"
    if section.get("skipped"):
        return f"{head}Not run: {section['skipped']}\n\n"
    return f"{head}{table(section['rows'], REWARD_COLS)}\n"


def store_markdown(sweep: dict, table) -> str:
    head = "## Feature store: SQLite vs Redis (same Triton, beam 128, closed loop)\n\n"
    if sweep.get("skipped"):
        return f"{head}Not run: {sweep['skipped']}\n"
    writes = [{"store": k, **v} for k, v in sweep["log_events"].items()]
    return (
        f"{head}{table(sweep['rows'], STORE_COLS)}\n"
        f"LogEvents, one event per call, one call at a time (acknowledged = durable):\n\n"
        f"{table(writes, ['store', 'p50_ms', 'p99_ms'])}\n"
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return "" if v is None else str(v)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/synthetic"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--beams", type=_ints, default=[64, 128, 256, 512])
    p.add_argument("--histories", type=_ints, default=[100, 1_000, 10_000, 100_000])
    p.add_argument("--lifelong-requests", type=int, default=200, help="warm calls per user")
    p.add_argument("--delays", type=_ints, default=[0, 500, 2_000, 10_000], help="µs")
    p.add_argument("--seconds", type=float, default=12.0, help="per level (>= 10: QPS window)")
    p.add_argument("--beam-concurrency", type=int, default=8)
    p.add_argument("--baseline-requests", type=int, default=300)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--heavy-users", type=int, default=100, help="users > 1,000 events: top-up")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peak = measure_peak_flops()
    cfg = repository_config(args.repository)
    lengths = history_lengths(args.artifacts / "features.sqlite")
    rng = np.random.default_rng(0)
    lifelong_users = {n: str((lengths - n).abs().idxmin()) for n in args.histories}
    pool = lengths.drop(list(lifelong_users.values()), errors="ignore")
    users = [str(u) for u in rng.choice(pool.index, min(args.users, len(pool)), replace=False)]
    report: dict = {
        "peak_flops": peak,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        "server": [],
        "baseline": [],
        "beam_sweep": [],
        "lifelong_sweep": [],
        "delay_sweep": [],
        "beam_concurrency": args.beam_concurrency,
    }
    heavy = [str(u) for u in lengths[lengths > 1000].index[: args.heavy_users]]
    tmp = Path(tempfile.mkdtemp(prefix="onerec-bench-"))
    store_copy = tmp / "baseline.sqlite"
    shutil.copy(args.artifacts / "features.sqlite", store_copy)
    _, item_tables, index = load_item_tables(args.artifacts)
    builder = PathwayBuilder(SQLiteFeatureStore(store_copy), cfg, item_tables.vectors)
    print(f"pathways of {len(users)} users ...", flush=True)
    flops_of = user_flops(builder, users, cfg, sorted({128, *args.beams}))
    print(f"top-up rates of {len(heavy)} heavy users ...", flush=True)
    report["topup"] = topup_rates(args.repository, builder, heavy)
    print("baseline ...", flush=True)  # first, with the machine to itself
    naive = NaiveServing(load_served_model(args.artifacts, item_tables), index.trie.sids)
    base = baseline_rows(naive, builder, users, flops_of, 128, args.baseline_requests)
    report["baseline"].append({"concurrency": 1, **_row(base, peak)})
    b = report["baseline"][0]
    print(f"baseline: {b['qps']:.2f} QPS p99 {b['p99_ms']:.0f} ms", flush=True)
    # The load generator's own full collections (torch, the data set and the baseline
    # model live in this process) would add their pauses to the latencies it measures:
    # freeze what setup loaded, and count the collections that still happen.
    gc.collect()
    gc.freeze()
    own_gc = GcPauses()
    with Stack(args.artifacts, args.repository, peak, tmp) as stack:
        print(f"warming {len(users)} users' lifelong caches ...", flush=True)
        for u in users:
            stack.stub.Recommend(pb.RecommendRequest(user_id=u, count=1), timeout=60)
        pids = cpu.roles(stack.front.proc.pid, stack.triton.proc.pid)
        for c in args.concurrency:
            before, front0 = scrape(stack.triton.ports.metrics), scrape(stack.metrics_port)
            cpu0, started = cpu.sample(pids), time.perf_counter()
            level = closed_loop(stack.stub, users, flops_of, 128, c, args.seconds)
            cores = cpu.cores_by_role(pids, cpu0, cpu.sample(pids), time.perf_counter() - started)
            after, front = scrape(stack.triton.ports.metrics), scrape(stack.metrics_port)
            row = {"concurrency": c, **_row(level, peak), "triton": triton_split(before, after)}
            row["cpu_cores"] = cores
            row["stages_ms"] = stage_split(front0, front)
            row["stages_p99_ms"] = stage_p99(front0, front)
            row["gc"] = gc_split(front0, front) | own_gc.take()
            row["prom_qps"] = front[("onerec_qps", ())]
            row["prom_mfu"] = front[("onerec_mfu", ())]
            report["server"].append(row)
            print(f"server c={c}: {row['qps']:.1f} QPS p99 {row['p99_ms']:.1f} ms", flush=True)
        best = max(report["server"], key=lambda r: r["qps"])
        matched = open_loop(
            stack.stub, users, 128, b["qps"], max(args.seconds, args.baseline_requests / b["qps"])
        )
        report["matched_load"] = {"offered_qps": b["qps"], **_row(matched, peak)}
        half = open_loop(stack.stub, users, 128, best["qps"] / 2, args.seconds)
        report["half_peak"] = {"offered_qps": best["qps"] / 2, **_row(half, peak)}
        for beam in args.beams:
            level = closed_loop(
                stack.stub, users, flops_of, beam, args.beam_concurrency, args.seconds
            )
            alone = closed_loop(stack.stub, users, flops_of, beam, 1, args.seconds)
            row = {"beam_width": beam, **_row(level, peak)}
            row |= {f"c1_{k}": v for k, v in _row(alone, peak).items() if k.endswith("_ms")}
            report["beam_sweep"].append(row)
            print(f"beam {beam}: {row['qps']:.1f} QPS, p99 alone {row['c1_p99_ms']:.1f} ms")
        report["lifelong_sweep"] = lifelong_sweep(
            stack.stub, lifelong_users, lengths, args.lifelong_requests
        )
        report["reward_selection"] = reward_selection(
            stack, users, flops_of, sorted({1, best["concurrency"]}), args.seconds
        )
        report["store_sweep"] = store_sweep(
            stack, users, flops_of, sorted({1, best["concurrency"]}), args.seconds
        )
        for delay in args.delays:  # last: it reloads the models
            set_queue_delay(stack.triton.grpc_url, delay)
            warm(stack.stub, users)
            before = scrape(stack.triton.ports.metrics)
            level = closed_loop(
                stack.stub, users, flops_of, 128, args.beam_concurrency, args.seconds
            )
            split = triton_split(before, scrape(stack.triton.ports.metrics))
            report["delay_sweep"].append(
                {
                    "max_queue_delay_us": delay,
                    **_row(level, peak),
                    "avg_batch_decoder": split["onerec_decoder"]["avg_batch"],
                }
            )
            print(f"delay {delay} us: {report['delay_sweep'][-1]['qps']:.1f} QPS", flush=True)
        illegal = scrape(stack.metrics_port)[("onerec_illegal_items", ())]  # the whole run
        report["prometheus"] = agreement(report["server"], illegal, args.seconds)
    shutil.rmtree(tmp, ignore_errors=True)
    report["summary"] = {
        "server_peak_qps": best["qps"],
        "server_peak_concurrency": best["concurrency"],
        "server_peak_p99_ms": best["p99_ms"],
        "baseline_qps": b["qps"],
        "throughput_ratio": best["qps"] / b["qps"],
        "baseline_p99_ms": b["p99_ms"],
        "matched_p99_ms": report["matched_load"]["p99_ms"],
        "p99_ratio": _ratio(report["matched_load"]["p99_ms"], b["p99_ms"]),
        "half_peak_qps": report["half_peak"]["offered_qps"],
        "half_peak_p99_ms": report["half_peak"]["p99_ms"],
        "mfu_at_peak": best["mfu"],
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench.md").write_text(markdown(report))
    for path in plots(report, args.out):
        print(f"wrote {path}")
    print((args.out / "bench.md").read_text())
    return 3 if report["prometheus"]["agree"] is False else 0  # 1: an uncaught exception


if __name__ == "__main__":
    sys.exit(main())
