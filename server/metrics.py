"""The front end's Prometheus metrics (names are DESIGN.md contracts), on their own port.

Every server has its own registry, so tests can run several in one process. QPS and MFU
are gauges computed at scrape time over a sliding window of completed requests:
``onerec_qps`` is Recommend calls per second over the window, and ``onerec_mfu`` is the
model FLOPs of those calls per second over the peak FLOP/s (a flag, or the best of a few
float32 GEMMs measured at start-up).
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)
STAGES = ("features", "lifelong", "triton", "catalog", "reward")
FALLBACKS = ("cold_start", "feature_store_unavailable", "model_unavailable")


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` (n x n) float32 GEMMs on this machine."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    a @ b  # warm the BLAS threads
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class SlidingWindow:
    """Events and their FLOPs over the last ``seconds``; thread-safe."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._events: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def add(self, flops: float = 0.0) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, flops))
            self._prune(now)  # bounded even when nobody scrapes

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.seconds:
            self._events.popleft()

    def rates(self) -> tuple[float, float]:
        """(events/s, FLOP/s) over the window (or since start, if that is shorter)."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            n, flops = len(self._events), sum(f for _, f in self._events)
        span = min(self.seconds, max(now - self._started, 1e-3))
        return n / span, flops / span


class Metrics:
    def __init__(self, peak_flops: float, window_s: float = 10.0) -> None:
        self.registry = r = CollectorRegistry()
        self.peak_flops = peak_flops
        self.window = SlidingWindow(window_s)
        self.requests = Counter(
            "onerec_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "onerec_request_latency_seconds",
            "gRPC call latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "onerec_stage_latency_seconds",
            "Recommend latency per stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.flops = Counter(
            "onerec_model_flops", "model FLOPs of the requests the model answered", registry=r
        )
        self.fallback = Counter(
            "onerec_fallback", "answers given by a fallback", ["reason"], registry=r
        )
        self.shed = Counter("onerec_shed", "calls refused by admission control", registry=r)
        self.illegal = Counter(
            "onerec_illegal_items", "decoded SIDs that map to no catalog item", registry=r
        )
        qps = Gauge("onerec_qps", f"Recommend calls/s over {window_s:.0f}s", registry=r)
        qps.set_function(lambda: self.window.rates()[0])
        mfu = Gauge("onerec_mfu", "model FLOP/s over peak FLOP/s", registry=r)
        mfu.set_function(lambda: self.window.rates()[1] / self.peak_flops)
        self.store_errors = Counter(
            "onerec_feature_store_errors",
            "calls the feature store did not answer (Recommend fell back, LogEvents refused)",
            ["method"],
            registry=r,
        )
        self.dependency_up = Gauge(
            "onerec_dependency_up",
            "1 while the health loop's last check of a dependency succeeded",
            ["dependency"],
            registry=r,
        )
        self.topped_up = Counter(
            "onerec_topped_up",
            "model answers that needed popular items because the search ran out of SIDs",
            registry=r,
        )
        self.triton_restarts = Counter(
            "onerec_triton_restarts",
            "times the supervisor restarted a local tritonserver that died",
            registry=r,
        )
        self.gc_pause = Histogram(
            "onerec_gc_pause_seconds",
            "the interpreter's garbage-collection pauses: every thread waits for them",
            ["generation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reward_skipped = Counter(
            "onerec_reward_skipped",
            "model answers ordered by the generator alone because the reward model did not "
            "answer in time",
            registry=r,
        )
        self.inflight = Gauge("onerec_inflight", "calls being served now", registry=r)
        peak = Gauge("onerec_peak_flops", "peak FLOP/s that MFU is relative to", registry=r)
        peak.set(peak_flops)
        for reason in FALLBACKS:
            self.fallback.labels(reason)
        for method in ("Recommend", "LogEvents"):
            self.store_errors.labels(method)
        for stage in STAGES:
            self.stage.labels(stage)
        self.shed.inc(0)
        self.illegal.inc(0)
        self.triton_restarts.inc(0)
        self.topped_up.inc(0)
        self.reward_skipped.inc(0)

    def watch_gc(self) -> None:
        """Time every collection into ``onerec_gc_pause_seconds``: a full collection of a
        large heap stops all threads, and shows in the tail latency."""
        started: list[float] = [0.0]

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pause = time.perf_counter() - started[0]
                self.gc_pause.labels(str(info["generation"])).observe(pause)

        gc.callbacks.append(callback)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
