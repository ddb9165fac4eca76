"""`make bench`: the serving stack against the naive baseline, same run, same weights.

Brings up Triton and the front end (its own ports), then measures over gRPC:

* **server sweep**: closed loop, concurrency 1..32, beam 128: QPS, p50/p95/p99, MFU,
  Triton's queue/compute split per request and the batch size each model saw, and the
  server's own ``onerec_qps``/``onerec_mfu`` read from Prometheus at the end of the level;
* **half-peak**: an open loop paced at half the best QPS, latency counted from each
  request's scheduled send time (no coordinated omission);
* **beam sweep**: 64..512 beams at a fixed concurrency;
* **lifelong sweep**: users with about 100..100,000 events: first call (compression) and
  warm calls (cached);
* **baseline**: :class:`onerec.naive_serving.NaiveServing` in this process, one request at
  a time, with the same pathways from the same feature store.

MFU = model FLOPs of the completed requests (``onerec.model.flops_per_request``, checked
against FlopCounterMode in the tests) per second, over the best of a few float32 GEMMs
measured here. Everything runs on one machine: the load generator, the front end and Triton
share its cores, which the report states next to the numbers.
"""

from __future__ import annotations

import argparse
import json
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
from prometheus_client.parser import text_string_to_metric_families

from onerec.experiment import load_catalog, load_model
from onerec.model import flops_per_request
from onerec.naive_serving import NaiveServing
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.feature_store import SQLiteFeatureStore
from server.metrics import measure_peak_flops
from server.pathway_builder import PathwayBuilder
from server.triton_client import probe, repository_config
from server.triton_launcher import TritonPorts, TritonProcess

MODELS = ("onerec_encoder", "onerec_decoder")


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removesuffix("_total")  # the parser adds it to every counter
            out[(name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _model_value(m: dict, name: str, model: str) -> float:
    return sum(v for (n, labels), v in m.items() if n == name and ("model", model) in labels)


class Stack:
    """Triton and an `onerec serve` front end on free ports; stopped on exit."""

    def __init__(self, artifacts: Path, repository: Path, peak: float, workdir: Path) -> None:
        cfg = repository_config(repository)
        self.triton = TritonProcess(
            repository, TritonPorts(*_free_ports(3)), probe=lambda u: probe(u, cfg)
        )
        self.port, self.metrics_port = _free_ports(2)
        self.store = workdir / "features.sqlite"
        shutil.copy(artifacts / "features.sqlite", self.store)  # load must not touch the build
        self.argv = [sys.executable, "-m", "onerec", "serve", "--artifacts", str(artifacts)]
        self.argv += ["--repository", str(repository), "--feature-store", str(self.store)]
        self.argv += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        self.argv += ["--peak-flops", str(peak), "--max-inflight", "256"]
        self.log = workdir / "front.log"

    def __enter__(self) -> Stack:
        self.triton.start()
        try:
            return self._start_front()
        except BaseException:
            self.triton.stop()
            raise

    def _start_front(self) -> Stack:
        self.argv += ["--triton-url", self.triton.grpc_url]
        self._log = open(self.log, "w")  # noqa: SIM115 - the child writes it until __exit__
        self.front = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RecommenderStub(self.channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.stub.Recommend(pb.RecommendRequest(user_id="warm-up"), timeout=5)
                return self
            except grpc.RpcError as e:
                if self.front.poll() is not None or time.monotonic() > deadline:
                    self.front.kill()
                    tail = self.log.read_text()[-2000:]
                    raise RuntimeError(f"front end did not start: {tail}") from e
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        try:
            self.channel.close()
            self.front.send_signal(signal.SIGTERM)
            try:
                self.front.wait(60)
            except subprocess.TimeoutExpired:
                self.front.kill()
            self._log.close()
        finally:
            self.triton.stop()


@dataclass
class Level:
    latencies: np.ndarray  # seconds
    wall: float
    flops: float
    errors: int


def closed_loop(stub, users, life_len, cfg, beam: int, clients: int, seconds: float) -> Level:
    """``clients`` threads, each sending its next request as soon as the last returns."""
    lat: list[float] = []
    flops, errors = [0.0], [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.perf_counter() < stop_at:
            u = int(rng.integers(len(users)))
            started = time.perf_counter()
            try:
                reply = stub.Recommend(
                    pb.RecommendRequest(user_id=users[u], beam_width=beam), timeout=30
                )
            except grpc.RpcError:
                reply = None
            if reply is None or reply.degraded:  # a failure or a fallback: not the model
                with lock:
                    errors[0] += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                lat.append(elapsed)
                flops[0] += flops_per_request(cfg, beam, life_len[u])

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Level(np.array(lat), time.perf_counter() - started, flops[0], errors[0])


def open_loop(stub, users, beam: int, rate: float, seconds: float) -> Level:
    """Requests sent on a fixed schedule; latency counts from the scheduled time."""
    n = int(rate * seconds)
    start = time.perf_counter() + 0.1
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    next_i = iter(range(n))

    def worker() -> None:
        rng = np.random.default_rng()
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            try:
                stub.Recommend(
                    pb.RecommendRequest(
                        user_id=users[int(rng.integers(len(users)))], beam_width=beam
                    ),
                    timeout=30,
                )
            except grpc.RpcError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                lat.append(time.perf_counter() - due)

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Level(np.array(lat), time.perf_counter() - start, 0.0, errors[0])


def _row(level: Level, peak: float) -> dict:
    ms = level.latencies * 1000
    pct = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return {
        "qps": len(ms) / level.wall,
        "p50_ms": float(pct[0]),
        "p95_ms": float(pct[1]),
        "p99_ms": float(pct[2]),
        "mfu": level.flops / level.wall / peak,
        "requests": len(ms),
        "errors_or_fallbacks": level.errors,
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


def baseline_rows(artifacts, store_path, users, cfg, beam, requests) -> dict:
    """The naive server, one request at a time, timed like the server (features included)."""
    _, catalog, index = load_catalog(artifacts)
    naive = NaiveServing(load_model(artifacts, catalog), index.trie.sids)
    store = SQLiteFeatureStore(store_path)
    builder = PathwayBuilder(store, cfg, catalog.vectors)
    rng = np.random.default_rng(1)
    lat, flops = [], 0.0
    started_all = time.perf_counter()
    for _ in range(requests):
        user = users[int(rng.integers(len(users)))]
        started = time.perf_counter()
        static = store.static(user)
        built = builder.build(user, int(time.time() * 1000), static)
        naive.recommend(built.pathways, beam)
        lat.append(time.perf_counter() - started)
        flops += flops_per_request(cfg, beam, len(built.pathways["life_items"]))
    return Level(np.array(lat), time.perf_counter() - started_all, flops, 0)


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
    split_rows = [
        {
            "concurrency": row["concurrency"],
            **{f"{m}.{k}": v for m, d in row["triton"].items() for k, v in d.items()},
        }
        for row in r["server"]
    ]
    split_cols = ["concurrency", *split_rows[0].keys() - {"concurrency"}] if split_rows else []
    s = r["summary"]
    return (
        f"# Benchmark\n\n{r['machine']}\n\nPeak {r['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"(best float32 GEMM). Load generator, front end and Triton share these cores.\n\n"
        f"## Summary\n\n"
        f"- throughput: server {s['server_peak_qps']:.1f} QPS vs baseline "
        f"{s['baseline_qps']:.1f} QPS: **{s['throughput_ratio']:.1f}x**\n"
        f"- p99 at matched load (concurrency 1): server {s['server_p99_c1_ms']:.1f} ms vs "
        f"baseline {s['baseline_p99_ms']:.1f} ms: **{s['p99_ratio']:.2f}x**\n"
        f"- p99 at half of peak ({s['half_peak_qps']:.1f} QPS offered, open loop): "
        f"**{s['half_peak_p99_ms']:.1f} ms**\n"
        f"- MFU at saturation: {s['mfu_at_peak']:.2e}\n\n"
        f"## Server (beam 128, closed loop)\n\n{table(r['server'], cols)}\n"
        f"## Triton per model (avg batch, µs per request)\n\n{table(split_rows, split_cols)}\n"
        f"## Baseline (torch eager, encoder every step, per-beam Python trie)\n\n"
        f"{table(r['baseline'], cols[:6])}\n"
        f"## Beam sweep (concurrency {r['beam_concurrency']})\n\n"
        f"{table(r['beam_sweep'], ['beam_width', 'qps', 'p50_ms', 'p99_ms', 'mfu'])}\n"
        f"## Lifelong history sweep\n\n"
        f"{table(r['lifelong_sweep'], ['history', 'first_call_ms', 'p50_ms', 'p99_ms'])}\n"
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return "" if v is None else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/synthetic"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32]
    )
    p.add_argument(
        "--beams", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256, 512]
    )
    p.add_argument(
        "--histories",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 1_000, 10_000, 100_000],
    )
    p.add_argument("--seconds", type=float, default=12.0, help="per level (>= 10: QPS window)")
    p.add_argument("--beam-concurrency", type=int, default=4)
    p.add_argument("--baseline-requests", type=int, default=40)
    p.add_argument("--users", type=int, default=300)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    peak = measure_peak_flops()
    cfg = repository_config(args.repository)
    lengths = history_lengths(args.artifacts / "features.sqlite")
    rng = np.random.default_rng(0)
    lifelong_users = {n: str((lengths - n).abs().idxmin()) for n in args.histories}
    pool = lengths.drop(list(lifelong_users.values()), errors="ignore")
    users = [str(u) for u in rng.choice(pool.index, min(args.users, len(pool)), replace=False)]
    life_len = [min(int(lengths[u]), cfg.lifelong_len) for u in users]
    report: dict = {
        "peak_flops": peak,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        "server": [],
        "baseline": [],
        "beam_sweep": [],
        "lifelong_sweep": [],
        "beam_concurrency": args.beam_concurrency,
    }
    tmp = Path(tempfile.mkdtemp(prefix="onerec-bench-"))
    with Stack(args.artifacts, args.repository, peak, tmp) as stack:
        print(f"warming {len(users)} users' lifelong caches ...", flush=True)
        for u in users:
            stack.stub.Recommend(pb.RecommendRequest(user_id=u, count=1), timeout=60)
        for c in args.concurrency:
            before = _scrape(stack.triton.ports.metrics)
            level = closed_loop(stack.stub, users, life_len, cfg, 128, c, args.seconds)
            after = _scrape(stack.triton.ports.metrics)
            front = _scrape(stack.metrics_port)
            row = {"concurrency": c, **_row(level, peak), "triton": triton_split(before, after)}
            row["prom_qps"] = front[("onerec_qps", ())]
            row["prom_mfu"] = front[("onerec_mfu", ())]
            report["server"].append(row)
            print(f"server c={c}: {row['qps']:.1f} QPS p99 {row['p99_ms']:.1f} ms", flush=True)
        best = max(report["server"], key=lambda r: r["qps"])
        half = open_loop(stack.stub, users, 128, best["qps"] / 2, args.seconds)
        report["half_peak"] = {"offered_qps": best["qps"] / 2, **_row(half, peak)}
        for beam in args.beams:
            level = closed_loop(
                stack.stub, users, life_len, cfg, beam, args.beam_concurrency, args.seconds
            )
            report["beam_sweep"].append({"beam_width": beam, **_row(level, peak)})
            print(f"beam {beam}: {report['beam_sweep'][-1]['qps']:.1f} QPS", flush=True)
        for n, user in lifelong_users.items():
            started = time.perf_counter()
            stack.stub.Recommend(pb.RecommendRequest(user_id=user), timeout=60)
            first = time.perf_counter() - started
            lat = []
            for _ in range(20):
                started = time.perf_counter()
                stack.stub.Recommend(pb.RecommendRequest(user_id=user), timeout=60)
                lat.append(time.perf_counter() - started)
            ms = np.array(lat) * 1000
            report["lifelong_sweep"].append(
                {
                    "history": n,
                    "user_history": int(lengths[user]),
                    "first_call_ms": first * 1000,
                    "p50_ms": float(np.percentile(ms, 50)),
                    "p99_ms": float(np.percentile(ms, 99)),
                }
            )
    store_copy = tmp / "baseline.sqlite"
    shutil.copy(args.artifacts / "features.sqlite", store_copy)
    print("baseline ...", flush=True)
    base = baseline_rows(args.artifacts, store_copy, users, cfg, 128, args.baseline_requests)
    report["baseline"].append({"concurrency": 1, **_row(base, peak)})
    shutil.rmtree(tmp, ignore_errors=True)
    b = report["baseline"][0]
    c1 = report["server"][0]
    report["summary"] = {
        "server_peak_qps": best["qps"],
        "baseline_qps": b["qps"],
        "throughput_ratio": best["qps"] / b["qps"],
        "server_p99_c1_ms": c1["p99_ms"],
        "baseline_p99_ms": b["p99_ms"],
        "p99_ratio": c1["p99_ms"] / b["p99_ms"],
        "half_peak_qps": report["half_peak"]["offered_qps"],
        "half_peak_p99_ms": report["half_peak"]["p99_ms"],
        "mfu_at_peak": best["mfu"],
    }
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench.md").write_text(markdown(report))
    for path in plots(report, args.out):
        print(f"wrote {path}")
    print((args.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
