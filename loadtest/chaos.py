"""`make chaos`: faults under load, measured. Writes reports/chaos.{json,md} and chaos_p99.png.

The fleet shape of the Helm chart, on this machine, every part a real process on free
ports with its files in a temporary directory: one ``redis-server`` (``appendfsync
always``) loaded with the build's data set, one ``onerec triton`` (tritonserver under its
supervisor) on the build's model repository, and two front ends A and B (``onerec serve
--triton-url ... --feature-store redis://...``) sharing both.

Clients sit behind a client-side balancer, as the Helm chart's Service sits behind
readiness probes: round robin over the front ends whose overall health is SERVING (checked
every quarter second), and one retry on the other front end after a transport error
(UNAVAILABLE, DEADLINE_EXCEEDED). About 80% of the calls are Recommend, 20% LogEvents of
one event with a unique timestamp and request_id; a LogEvents that was not acknowledged is
sent again with the same request_id, with backoff, until it is. Every acknowledged event
is remembered and, once each fault is over, read back from Redis: none may be lost.

First the peak (a closed loop, Recommend only). Then four faults in turn, each after a
steady window, under a closed loop: ``kill -9`` of front end A (restarted at once, as
Kubernetes would), ``kill -9`` of tritonserver (its supervisor restarts it), ``kill -9``
of Redis (restarted on the same port and directory a few seconds later) and SIGTERM of A
(it drains; restarted once it has exited). Then a soak: an open loop at half the peak,
with the RSS of every process sampled at its start and end.

Exit 0; 3 when an acknowledged event was lost, a fault did not recover, a call failed
during the drain, Redis acknowledged an event while down, the soak saw an error, an
illegal item was returned, or a process's RSS grew by the limit or more (1: an uncaught
exception). Every process it starts is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.cpu import stub_model
from loadtest.net import free_ports, scrape
from loadtest.pacing import on_schedule
from onerec.cli.build import load_features
from onerec.data.schema import Dataset
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.metrics import measure_peak_flops
from server.redis_store import RedisFeatureStore
from server.triton_client import probe, repository_config

if __name__ == "__main__":  # `python loadtest/chaos.py`: the checkout's loadtest/ too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtest.redis_server import RedisServer

MODEL_HEALTH = "onerec.v1.Recommender"
STORE_HEALTH = "onerec.FeatureStore"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FRONTS = ("A", "B")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The balancer's health checks: well inside the drain, so a draining front end is out of
# the rotation before it stops (grpc cancels calls that reach a stopping server).
HEALTH_EVERY_S = 0.25
# A client reconnects soon after a front end returns, as a balancer's health checks would;
# grpc's default reconnect backoff (1 s, growing to 120 s) would time the client, not us.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
RESEND_BACKOFF_S = (0.2, 2.0)  # an unacknowledged LogEvents: first wait, doubling up to
DRAIN_S = 2.0
RECOVERY = {
    "frontend_kill": (
        "`kill -9` of front end A, restarted at once on the same port",
        "A answers a Recommend from the model (`degraded` empty) again",
    ),
    "triton_kill": (
        "`kill -9` of tritonserver (the child of `onerec triton`); its supervisor restarts it",
        "both front ends answer a Recommend from the model again",
    ),
    "redis_crash": (
        "`kill -9` of redis-server; restarted on the same port and directory after {down} s",
        "after the restart, each front end acknowledges a LogEvents and answers a Recommend "
        "from the model",
    ),
    "frontend_drain": (
        f"SIGTERM to front end A (`--drain-s {DRAIN_S:g}`), restarted once it has exited",
        "A's `onerec.v1.Recommender` health is SERVING again",
    ),
}


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# -- the traffic -------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One logged event; its timestamp is unique in the run, so it can be found again."""

    user: str
    item: str
    item_idx: int  # the model's index, as the store keeps it
    timestamp_ms: int
    request_id: str

    def request(self) -> pb.LogEventsRequest:
        e = pb.Event(item_id=self.item, timestamp_ms=self.timestamp_ms, watch_ms=5_000, click=True)
        return pb.LogEventsRequest(user_id=self.user, events=[e], request_id=self.request_id)


@dataclass(frozen=True)
class Call:
    """One call as the client saw it, its retry on the other front end included."""

    method: str  # Recommend | LogEvents
    due: float  # monotonic: when it was meant to go (open loop) or went (closed loop)
    done: float
    outcome: str  # model | fallback | acked | failed
    retried: bool
    front: int  # the front end that answered, or failed last
    detail: str = ""  # a fallback's reason, or a failure's status code
    resend: bool = False  # a LogEvents sent again with its request_id


def health(stub: health_pb2_grpc.HealthStub, service: str, timeout_s: float) -> int | None:
    """``service``'s health status on one front end; None when it does not answer."""
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status
    except grpc.RpcError:
        return None


@dataclass(frozen=True)
class Reply:
    message: object | None  # None: failed
    front: int
    retried: bool
    code: str = ""


class Fleet:
    """The client half of a load balancer over A and B: round robin over the front ends in
    rotation (overall health SERVING at the last check), and one retry on the other front
    end after a transport error. With none in rotation it tries them all in turn."""

    def __init__(self, addresses: list[str]) -> None:
        self.channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [pb_grpc.RecommenderStub(c) for c in self.channels]
        self._health = [health_pb2_grpc.HealthStub(c) for c in self.channels]
        self.in_rotation = [True] * len(addresses)
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_health, daemon=True)
        self._watcher.start()

    def _watch_health(self) -> None:
        while not self._stop.wait(HEALTH_EVERY_S):
            for front, stub in enumerate(self._health):
                self.in_rotation[front] = health(stub, "", HEALTH_EVERY_S) == SERVING

    def call(self, method: str, request, timeout_s: float) -> Reply:
        front, retried = next(self._turn) % 2, False
        if not self.in_rotation[front] and self.in_rotation[1 - front]:
            front = 1 - front
        while True:
            try:
                return Reply(
                    getattr(self.stubs[front], method)(request, timeout=timeout_s), front, retried
                )
            except grpc.RpcError as e:
                if retried or e.code() not in RETRYABLE:
                    return Reply(None, front, retried, e.code().name)
            front, retried = 1 - front, True

    def close(self) -> None:
        self._stop.set()
        self._watcher.join()
        for channel in self.channels:
            channel.close()


class Load:
    """The traffic mix, every call's outcome, and the events acknowledged so far. A thread
    sends unacknowledged LogEvents again (same request_id) until they are acknowledged."""

    def __init__(self, fleet: Fleet, users: list[str], items: list[str], timeout_s: float):
        self.fleet, self.users, self.items, self.timeout_s = fleet, users, items, timeout_s
        self.calls: list[Call] = []  # appended from many threads (atomic in CPython)
        self.acked: list[Event] = []
        self._pending: list[tuple[float, float, Event]] = []  # (due, backoff, event)
        self._unacked: set[str] = set()  # request ids refused so far, queued or being resent
        self._lock = threading.Lock()
        self._ids, self._seeds = itertools.count(), itertools.count(1)
        self._last_ms = 0
        self._run = uuid.uuid4().hex[:8]
        self._stop = threading.Event()
        self._resender = threading.Thread(target=self._resend_loop, daemon=True)

    def rng(self) -> np.random.Generator:
        """A generator of its own for each client thread."""
        return np.random.default_rng(next(self._seeds))

    def new_event(self, rng: np.random.Generator) -> Event:
        with self._lock:
            self._last_ms = max(self._last_ms + 1, int(time.time() * 1000))
            ts, n = self._last_ms, next(self._ids)
        item = int(rng.integers(len(self.items)))
        user = self.users[int(rng.integers(len(self.users)))]
        return Event(user, self.items[item], item, ts, f"chaos-{self._run}-{n}")

    def one(self, rng: np.random.Generator, log_share: float, due: float | None = None) -> None:
        if rng.random() < log_share:
            self.log(self.new_event(rng), due)
        else:
            self.recommend(self.users[int(rng.integers(len(self.users)))], due)

    def recommend(self, user: str, due: float | None = None) -> None:
        due = time.monotonic() if due is None else due
        request = pb.RecommendRequest(user_id=user, count=10)
        r = self.fleet.call("Recommend", request, self.timeout_s)
        if r.message is None:
            outcome, detail = "failed", r.code
        else:
            outcome, detail = (
                ("fallback", r.message.degraded) if r.message.degraded else ("model", "")
            )
        self.calls.append(
            Call("Recommend", due, time.monotonic(), outcome, r.retried, r.front, detail)
        )

    def log(self, event: Event, due: float | None = None, backoff_s: float = 0.0) -> None:
        """Send ``event``; unless acknowledged, queue it to be sent again after a backoff."""
        due = time.monotonic() if due is None else due
        r = self.fleet.call("LogEvents", event.request(), self.timeout_s)
        accepted = None if r.message is None else r.message.accepted
        if accepted == 1:
            self.record_ack(event)
        elif accepted is None:  # not stored, or not known to be: again, with its id
            wait = min(RESEND_BACKOFF_S[1], max(RESEND_BACKOFF_S[0], 2 * backoff_s))
            with self._lock:
                self._pending.append((time.monotonic() + wait, wait, event))
                self._unacked.add(event.request_id)
        outcome, detail = ("acked", "") if accepted == 1 else ("failed", r.code)
        if accepted is not None and accepted != 1:  # an answer, but not the one event
            detail = f"accepted={accepted}"
        resend = backoff_s > 0
        call = Call("LogEvents", due, time.monotonic(), outcome, r.retried, r.front, detail, resend)
        self.calls.append(call)

    def record_ack(self, event: Event) -> None:
        with self._lock:
            self.acked.append(event)
            self._unacked.discard(event.request_id)

    def acked_so_far(self) -> list[Event]:
        with self._lock:
            return list(self.acked)

    def pending(self) -> int:
        with self._lock:
            return len(self._unacked)

    def _take_due(self) -> list[tuple[float, Event]]:
        now = time.monotonic()
        with self._lock:
            due = [(b, e) for t, b, e in self._pending if t <= now]
            self._pending = [p for p in self._pending if p[0] > now]
        return due

    def _resend_loop(self) -> None:
        while not self._stop.wait(0.05):
            for backoff, event in self._take_due():
                self.log(event, backoff_s=backoff)

    def start(self) -> None:
        self._resender.start()

    def settle(self, timeout_s: float) -> int:
        """Wait until every LogEvents was acknowledged (or ``timeout_s``); how many were not."""
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.pending()

    def stop(self) -> None:
        self._stop.set()
        if self._resender.is_alive():
            self._resender.join(30)


@contextlib.contextmanager
def closed_loop(load: Load, clients: int, log_share: float) -> Iterator[None]:
    """``clients`` threads, each sending its next call as soon as the last returned."""
    stop = threading.Event()

    def client(rng: np.random.Generator) -> None:
        while not stop.is_set():
            load.one(rng, log_share)

    threads = [
        threading.Thread(target=client, args=(load.rng(),), daemon=True) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def open_loop(load: Load, rate: float, seconds: float, log_share: float) -> tuple[float, float]:
    """The mix on a fixed schedule (:func:`loadtest.pacing.on_schedule`): (start, end)."""
    return on_schedule(rate, seconds, lambda due, rng: load.one(rng, log_share, due))


class Probe:
    """One front end at a time, outside the balancer: is the fault over there yet?"""

    def __init__(self, addresses: list[str], load: Load) -> None:
        self.channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self.stubs = [pb_grpc.RecommenderStub(c) for c in self.channels]
        self.health = [health_pb2_grpc.HealthStub(c) for c in self.channels]
        self.load, self.user = load, load.users[0]
        self._unacked: dict[int, Event] = {}
        self._rng = load.rng()

    def model_answer(self, front: int) -> bool:
        request = pb.RecommendRequest(user_id=self.user, count=10)
        try:
            return self.stubs[front].Recommend(request, timeout=2).degraded == ""
        except grpc.RpcError:
            return False

    def acknowledges(self, front: int) -> bool:
        """A LogEvents acknowledged (one event, sent again with its id until it is)."""
        event = self._unacked.setdefault(front, self.load.new_event(self._rng))
        try:
            ok = self.stubs[front].LogEvents(event.request(), timeout=2).accepted == 1
        except grpc.RpcError:
            return False
        if ok:
            self.load.record_ack(event)
            del self._unacked[front]
        return ok

    def status(self, front: int, service: str = MODEL_HEALTH) -> int | None:
        return health(self.health[front], service, 2.0)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


# -- the stack ---------------------------------------------------------------------------


class Child:
    """A process of the stack with its output in a log file; restartable with the same argv."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log, self.env = argv, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Child:
        with open(self.log, "a") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        if not self.alive():
            return
        try:
            self.kill(signal.SIGTERM, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


class FrontEnd(Child):
    """``onerec serve`` on the shared Triton and Redis."""

    def __init__(self, name: str, ports: list[int], common: list[str], workdir: Path) -> None:
        self.name, (self.port, self.metrics_port) = name, ports
        argv = [*common, "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        env = dict(os.environ, ONEREC_PROBE_INTERVAL_S="0.5")
        super().__init__(argv, workdir / f"front-{name}.log", env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=MODEL_HEALTH)
            deadline = time.monotonic() + timeout_s
            while True:
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"front end {self.name} did not serve:\n{self.tail()}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(request, timeout=2).status == SERVING:
                        return
                time.sleep(0.3)


class Triton(Child):
    """``onerec triton``: tritonserver under its supervisor, which restarts it when it dies."""

    def __init__(self, repository: Path, ports: list[int], workdir: Path) -> None:
        self.ports = ports
        argv = [sys.executable, "-m", "onerec", "triton", "--repository", str(repository)]
        for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports, strict=True):
            argv += [flag, str(port)]
        super().__init__(argv, workdir / "triton.log")
        self.cfg = repository_config(repository)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Until a real inference succeeds (ready models alone do not prove it serves)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"onerec triton did not serve:\n{self.tail()}")
            try:
                probe(self.grpc_url, self.cfg, timeout_s=10)
                return
            except Exception:  # refused while it starts
                time.sleep(1.0)

    def server(self) -> psutil.Process | None:
        """The running tritonserver, a child of the supervisor."""
        children = psutil.Process(self.pid).children()
        return next((c for c in children if c.name() == "tritonserver"), None)

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGTERM (the supervisor stops Triton, which unloads its models); whatever is
        left of the tree afterwards is killed."""
        if not self.alive():
            return
        tree = psutil.Process(self.pid).children(recursive=True)
        super().stop(timeout_s)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


class Stack:
    """Redis (loaded), a supervised Triton and front ends A and B, on free ports; a context
    manager that stops everything it started, whatever happens."""

    def __init__(self, args: argparse.Namespace, ds: Dataset, peak_flops: float, workdir: Path):
        self.args, self.ds, self.peak_flops, self.workdir = args, ds, peak_flops, workdir
        self._stops = contextlib.ExitStack()

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self._stops.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        say("stopping the stack")
        self._stops.close()

    def _start(self) -> None:
        a = self.args
        (self.workdir / "redis").mkdir()
        self.redis = RedisServer(self.workdir / "redis")
        self._stops.callback(self.redis.stop)
        self.redis.start()
        say(f"redis-server on :{self.redis.port}; loading {len(self.ds.events):,} events")
        load_features(Path(a.artifacts), Path(a.repository), self.redis.url(), force=True)
        compact_aof(self.redis.url())
        ports = free_ports(7)
        self.triton = Triton(a.repository, ports[:3], self.workdir)
        self._stops.callback(self.triton.stop)
        say(f"onerec triton on :{ports[1]} ({a.repository})")
        self.triton.start().wait_ready()
        common = [sys.executable, "-m", "onerec", "serve", "--artifacts", str(a.artifacts)]
        common += ["--repository", str(a.repository), "--triton-url", self.triton.grpc_url]
        common += ["--feature-store", self.redis.url(), "--drain-s", str(DRAIN_S)]
        common += ["--peak-flops", str(self.peak_flops)]
        self.fronts = [
            FrontEnd(name, ports[3 + 2 * i : 5 + 2 * i], common, self.workdir)
            for i, name in enumerate(FRONTS)
        ]
        self._stops.callback(self._stop_fronts)
        for front in self.fronts:
            front.start()
        for front in self.fronts:
            front.wait_serving()
        say("front ends " + ", ".join(f"{f.name} :{f.port}" for f in self.fronts) + " serving")

    def _stop_fronts(self) -> None:
        """SIGTERM to both at once (each drains for a while), then wait for each."""
        for front in self.fronts:
            if front.alive():
                front.proc.send_signal(signal.SIGTERM)
        for front in self.fronts:
            front.stop()

    @property
    def addresses(self) -> list[str]:
        return [f.address for f in self.fronts]


def compact_aof(url: str, timeout_s: float = 120.0) -> None:
    """Rewrite the AOF after the bulk load, so that a crash replays a compact file, as on a
    Redis that has been up a while (and no rewrite forks during the soak)."""
    with redis.Redis.from_url(url) as r:
        with contextlib.suppress(redis.ResponseError):  # one already running is as good
            r.bgrewriteaof()
        deadline = time.monotonic() + timeout_s
        while True:
            info = r.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("redis AOF rewrite did not finish")
            time.sleep(0.2)


def warm(addresses: list[str], users: list[str], threads: int = 4) -> None:
    """Each user's lifelong compression cached on every front end, so that the peak and the
    soak's RSS do not count a cache filling (beam 16: the compression is what a first call
    pays, not the search)."""
    work = iter([(a, u) for a in addresses for u in users])
    lock = threading.Lock()
    channels = {a: grpc.insecure_channel(a) for a in addresses}
    stubs = {a: pb_grpc.RecommenderStub(c) for a, c in channels.items()}

    def worker() -> None:
        while True:
            with lock:
                job = next(work, None)
            if job is None:
                return
            request = pb.RecommendRequest(user_id=job[1], count=10, beam_width=16)
            stubs[job[0]].Recommend(request, timeout=120)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for channel in channels.values():
        channel.close()


# -- the faults --------------------------------------------------------------------------

# A fault's instant (monotonic), seconds to recovery per front end, and what else it saw.
Outcome = tuple[float, dict[str, float | None], dict]


def recovery(
    check: Callable[[int], bool], fronts: list[int], since: float, timeout_s: float
) -> dict[str, float | None]:
    """Seconds from ``since`` until ``check(front)`` first held, per front end's name; None
    for one where it did not within ``timeout_s``. Polled every 0.2 s."""
    done: dict[int, float] = {}
    while len(done) < len(fronts) and time.monotonic() - since < timeout_s:
        for front in fronts:
            if front not in done and check(front):
                done[front] = time.monotonic() - since
        if len(done) < len(fronts):
            time.sleep(0.2)
    return {FRONTS[f]: done.get(f) for f in fronts}


def kill_front_end(stack: Stack, probe: Probe, load: Load, args: argparse.Namespace) -> Outcome:
    """A crashed pod: in-flight calls break, the balancer retries them on B."""
    a = stack.fronts[0]
    t0 = time.monotonic()
    a.kill(signal.SIGKILL)
    a.start()  # at once, as Kubernetes restarts a container
    restarted = time.monotonic() - t0
    recovered = recovery(probe.model_answer, [0], t0, args.recovery_timeout_s)
    return t0, recovered, {"restarted_after_s": restarted}


def kill_triton(stack: Stack, probe: Probe, load: Load, args: argparse.Namespace) -> Outcome:
    """A crashed Triton: both front ends fall back until the supervisor's restart serves."""
    victim = stack.triton.server()
    if victim is None:
        raise RuntimeError(f"no tritonserver under onerec triton:\n{stack.triton.tail()}")
    t0 = time.monotonic()
    victim.kill()
    victim.wait(30)
    recovered = recovery(probe.model_answer, [0, 1], t0, args.recovery_timeout_s)
    successor = stack.triton.server()
    return t0, recovered, {"killed_pid": victim.pid, "new_pid": successor and successor.pid}


def crash_redis(stack: Stack, probe: Probe, load: Load, args: argparse.Namespace) -> Outcome:
    """A crashed Redis: fallbacks and refused LogEvents, then the AOF must hold every ack."""
    t0 = time.monotonic()
    stack.redis.kill(signal.SIGKILL)
    dead = time.monotonic()
    # Meanwhile: how soon each front end's health says the store is away.
    store_down = recovery(
        lambda f: probe.status(f, STORE_HEALTH) == NOT_SERVING, [0, 1], t0, args.redis_down_s
    )
    time.sleep(max(0.0, t0 + args.redis_down_s - time.monotonic()))
    back = time.monotonic()
    stack.redis.start()  # replays the AOF before it answers
    replayed = time.monotonic() - back

    def check(front: int) -> bool:
        return probe.acknowledges(front) and probe.model_answer(front)

    recovered = recovery(check, [0, 1], t0, args.recovery_timeout_s)
    # Sent once it was dead, answered before it was started again: no model, no ack.
    outage = [c for c in list(load.calls) if c.due > dead and c.done < back]
    during = Counter(f"{c.method} {c.outcome}" for c in outage)
    detail = {
        "down_s": back - t0,
        "restart_s": replayed,
        "during_outage": dict(during),
        "store_health_not_serving_after_s": store_down,
    }
    return t0, recovered, detail


def drain_front_end(stack: Stack, probe: Probe, load: Load, args: argparse.Namespace) -> Outcome:
    """A rolling update's SIGTERM: A drains while the balancer moves to B; nothing fails."""
    a = stack.fronts[0]
    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    not_serving = None
    while a.alive() and not_serving is None:
        if probe.status(0, "") == NOT_SERVING:
            not_serving = time.monotonic() - t0
        time.sleep(0.05)
    code = a.proc.wait(60)
    exited = time.monotonic() - t0
    answered = sum(
        c.front == 0 and c.outcome != "failed" and t0 < c.done < t0 + exited
        for c in list(load.calls)
    )
    a.start()
    recovered = recovery(lambda f: probe.status(f) == SERVING, [0], t0, args.recovery_timeout_s)
    detail = {
        "not_serving_after_s": not_serving,
        "exit_code": code,
        "exited_after_s": exited,
        "answered_by_A_while_draining": answered,
    }
    return t0, recovered, detail


FAULTS = {
    "frontend_kill": kill_front_end,
    "triton_kill": kill_triton,
    "redis_crash": crash_redis,
    "frontend_drain": drain_front_end,
}


def tally(calls: list[Call], lo: float, hi: float) -> dict:
    """The calls that returned in [lo, hi): sent = model + fallback + events_acked + failed."""
    sel = [c for c in calls if lo <= c.done < hi]
    n = Counter(c.outcome for c in sel)
    return {
        "sent": len(sel),
        "model": n["model"],
        "fallback": n["fallback"],
        "failed": n["failed"],
        "retried": sum(c.retried for c in sel),
        "events_acked": n["acked"],
        "resends": sum(c.resend for c in sel),
        "fallback_reasons": dict(Counter(c.detail for c in sel if c.outcome == "fallback")),
        "failures": dict(Counter(f"{c.method} {c.detail}" for c in sel if c.outcome == "failed")),
    }


def check_events(url: str, events: list[Event]) -> dict:
    """Every acknowledged event read back from Redis: lost (absent) and duplicated (there
    more than once: a retry applied twice)."""
    store = RedisFeatureStore(url, timeout_s=10.0)
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user].append(e)
    lost = duplicated = 0
    try:
        for user, logged in by_user.items():
            h = store.history(user)
            stored = Counter(zip(h.timestamp.tolist(), h.items.tolist(), strict=True))
            for e in logged:
                count = stored[(e.timestamp_ms, e.item_idx)]
                lost += count == 0
                duplicated += count > 1
    finally:
        store.close()
    return {"checked": len(events), "lost": lost, "duplicated": duplicated}


def dependencies(stack: Stack) -> dict:
    """Each front end's ``onerec_dependency_up`` as Prometheus would scrape it."""
    out = {}
    for front in stack.fronts:
        m = scrape(front.metrics_port)
        out[front.name] = {
            dict(labels)["dependency"]: v
            for (name, labels), v in m.items()
            if name == "onerec_dependency_up"
        }
    return out


def run_fault(name: str, stack: Stack, probe: Probe, load: Load, args: argparse.Namespace) -> dict:
    """A steady window, the fault, recovery, a settling window; then every acknowledged
    event so far is read back from Redis."""
    load.settle(args.recovery_timeout_s)  # the last fault's resends are not steady load
    steady_from = time.monotonic()
    time.sleep(args.steady_s)
    say(f"fault {name}")
    t0, recovered, detail = FAULTS[name](stack, probe, load, args)
    times = list(recovered.values())
    recovery_s = None if None in times else max(times)
    end = (time.monotonic() if recovery_s is None else t0 + recovery_s) + args.settle_s
    time.sleep(max(0.0, end - time.monotonic()))
    events = check_events(stack.redis.url(), load.acked_so_far())
    row = {
        "fault": name,
        **tally(list(load.calls), t0, end),
        "acked_lost": events["lost"],
        "acked_duplicated": events["duplicated"],
        "acked_checked": events["checked"],
        "recovery_s": recovery_s,
        "recovery_per_front_end_s": recovered,
        "window_s": end - t0,
        "detail": detail,
        "dependency_up": dependencies(stack),
        "steady": tally(list(load.calls), steady_from, t0),
    }
    say(
        f"  recovered in {_fmt(recovery_s)} s; {row['model']} model, {row['fallback']} fallback, "
        f"{row['failed']} failed, {row['retried']} retried; {events['lost']} of "
        f"{events['checked']} acknowledged events lost"
    )
    return row


# -- peak and soak -----------------------------------------------------------------------


def _ms(seconds: list[float]) -> tuple[float | None, float | None]:
    if not seconds:
        return None, None
    p50, p99 = np.percentile(np.array(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


def measure_peak(load: Load, clients: int, seconds: float) -> dict:
    """A closed loop of Recommend only: model answers per second."""
    with closed_loop(load, clients, log_share=0.0):
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
    calls = [c for c in list(load.calls) if start <= c.done < end]
    model = [c.done - c.due for c in calls if c.outcome == "model"]
    p50, p99 = _ms(model)
    return {
        "clients": clients,
        "seconds": seconds,
        "qps": len(model) / (end - start),
        "p50_ms": p50,
        "p99_ms": p99,
        "not_model": len(calls) - len(model),
    }


def _label(p: psutil.Process) -> str:
    """A process's name; a python backend stub's model too."""
    model = stub_model(p)
    return f"{p.name()} ({model})" if model else p.name()


def rss(stack: Stack) -> dict[int, tuple[str, int]]:
    """pid -> (what it is, RSS bytes), for every process of the stack and its children."""
    roots = [(f.pid, f"front end {f.name}") for f in stack.fronts]
    roots += [(stack.triton.pid, "onerec triton"), (stack.redis.proc.pid, "redis-server")]
    out = {}
    for pid, label in roots:
        root = psutil.Process(pid)
        out[pid] = (label, root.memory_info().rss)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                out[child.pid] = (f"{label} / {_label(child)}", child.memory_info().rss)
    return out


def rss_rows(before: dict, after: dict) -> list[dict]:
    """Each process at the soak's start and end; growth only for those in both samples."""
    rows = []
    for pid in sorted(before.keys() | after.keys()):
        label = (before.get(pid) or after[pid])[0]
        start, end = before.get(pid, (label, None))[1], after.get(pid, (label, None))[1]
        growth = 100 * (end - start) / start if start and end is not None else None
        rows.append(
            {
                "process": label,
                "pid": pid,
                "start_mib": None if start is None else start / 2**20,
                "end_mib": None if end is None else end / 2**20,
                "growth_pct": growth,
            }
        )
    return rows


def buckets(calls: list[Call], start: float, seconds: float, width: float) -> list[dict]:
    """Per ``width`` seconds: calls answered (QPS), and Recommend p50/p99 of those due."""
    rows = []
    for k in range(math.ceil(seconds / width)):
        lo, hi = start + k * width, start + min((k + 1) * width, seconds)
        due = [c for c in calls if lo <= c.due < hi]
        answered = sum(lo <= c.done < hi and c.outcome != "failed" for c in calls)
        p50, p99 = _ms(
            [c.done - c.due for c in due if c.method == "Recommend" and c.outcome == "model"]
        )
        errors = sum(c.outcome in ("failed", "fallback") for c in due)
        rows.append(
            {
                "t_s": k * width,
                "qps": answered / (hi - lo),
                "p50_ms": p50,
                "p99_ms": p99,
                "errors": errors,
            }
        )
    return rows


def soak(stack: Stack, load: Load, rate: float, args: argparse.Namespace) -> dict:
    """An open loop at ``rate`` after a warm-up; RSS of every process at start and end."""
    say(f"soak: warm-up {args.warmup_s:g} s, then {args.soak_s:g} s at {rate:.1f} QPS")
    open_loop(load, rate, args.warmup_s, args.log_share)
    before = rss(stack)
    start, end = open_loop(load, rate, args.soak_s, args.log_share)
    after = rss(stack)
    calls = [c for c in list(load.calls) if start <= c.due < start + args.soak_s]
    counts = tally(calls, -math.inf, math.inf)
    p50, p99 = _ms(
        [c.done - c.due for c in calls if c.method == "Recommend" and c.outcome == "model"]
    )
    rows = rss_rows(before, after)
    growth = [r["growth_pct"] for r in rows if r["growth_pct"] is not None]
    return {
        "offered_qps": rate,
        "seconds": args.soak_s,
        "warmup_s": args.warmup_s,
        "achieved_qps": (counts["sent"] - counts["failed"]) / (end - start),
        "p50_ms": p50,
        "p99_ms": p99,
        **counts,
        "errors": counts["failed"] + counts["fallback"],
        "rss": rows,
        "max_rss_growth_pct": max(growth, default=None),
        "buckets": buckets(calls, start, args.soak_s, args.bucket_s),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["soak"]["buckets"]
    t = [r["t_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [r["p99_ms"] for r in rows], "o-", markersize=3, label="Recommend p99")
    ax.plot(t, [r["p50_ms"] for r in rows], "--", alpha=0.6, label="Recommend p50")
    top = max((r["p99_ms"] or 0 for r in rows), default=0) * 1.2 or None
    ax.set(xlabel="seconds into the soak", ylabel="latency (ms)", ylim=(0, top))
    ax.set_title(f"soak: open loop at {report['soak']['offered_qps']:.1f} QPS offered")
    qps = ax.twinx()
    qps.plot(t, [r["qps"] for r in rows], ":", color="gray", label="answered QPS")
    qps.set(ylabel="QPS", ylim=(0, max((r["qps"] for r in rows), default=0) * 1.2 or None))
    lines = ax.get_legend_handles_labels()[0] + qps.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- the report --------------------------------------------------------------------------


def problems(report: dict, max_growth_pct: float) -> list[dict]:
    """What makes the run fail, each with its kind and a sentence."""
    out = []

    def add(kind: str, text: str) -> None:
        out.append({"kind": kind, "problem": text})

    for f in report["faults"]:
        name = f["fault"]
        if f["acked_lost"]:
            add("lost", f"{name}: {f['acked_lost']} acknowledged events not in Redis")
        if f["recovery_s"] is None:
            add(
                "recovery",
                f"{name}: not recovered within {report['settings']['recovery_timeout_s']:g} s",
            )
        if name == "frontend_drain" and f["failed"]:
            add(
                "drain",
                f"{name}: {f['failed']} calls failed despite the drain and the retry "
                f"({', '.join(f'{k}: {v}' for k, v in f['failures'].items())})",
            )
        acked_down = f["detail"].get("during_outage", {})
        for key in ("LogEvents acked", "Recommend model"):
            if acked_down.get(key):
                add("outage", f"{name}: {acked_down[key]} x '{key}' while Redis was down")
    final = report["events"]
    if final["lost"]:
        add("lost", f"end of run: {final['lost']} of {final['checked']} acknowledged events lost")
    s = report["soak"]
    if s["errors"]:
        add("soak", f"soak: {s['errors']} errors ({s['failed']} failed, {s['fallback']} fallbacks)")
    for row in s["rss"]:
        if row["growth_pct"] is not None and row["growth_pct"] >= max_growth_pct:
            add(
                "rss",
                f"soak: {row['process']} (pid {row['pid']}) RSS grew {row['growth_pct']:.1f}%",
            )
    if report["illegal_items"]:
        add("illegal", f"onerec_illegal_items_total is {report['illegal_items']:.0f}")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return "" if v is None else str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |\n" for r in rows)


FAULT_COLS = ["fault", "sent", "model", "fallback", "failed", "retried", "events_acked"]
FAULT_COLS += ["acked_lost", "recovery_s"]


def markdown(r: dict) -> str:
    s, p, cfg = r["soak"], r["peak"], r["settings"]
    meanings = "".join(
        f"- **{f['fault']}**: {RECOVERY[f['fault']][0].format(down=cfg['redis_down_s'])}. "
        f"Recovered when {RECOVERY[f['fault']][1]}. Per front end: "
        f"{', '.join(f'{k} {_fmt(v)} s' for k, v in f['recovery_per_front_end_s'].items())}. "
        f"{_details(f)}\n"
        for f in r["faults"]
    )
    steady = [{"fault": f["fault"], **f["steady"]} for f in r["faults"]]
    verdict = "".join(f"- **{x['problem']}**\n" for x in r["problems"]) or "- none: **pass**\n"
    return (
        f"# Faults under load\n\n{r['machine']}. The load generator, both front ends, Triton "
        f"and Redis share these cores (and so does anything else running).\n\n"
        f"Stack: redis-server (`appendfsync always`) holding {r['data']['users']:,} users and "
        f"{r['data']['events']:,} events, `onerec triton` (supervised tritonserver), front ends A "
        f"and B (`onerec serve --drain-s {DRAIN_S:g}`, health probe every 0.5 s). Load: "
        f"{cfg['clients']} closed-loop clients over {cfg['users']} users, "
        f"{1 - cfg['log_share']:.0%} Recommend (count 10, beam 128, timeout "
        f"{cfg['timeout_s']:g} s), {cfg['log_share']:.0%} LogEvents of one event with a unique "
        f"request_id. Round robin over the front ends whose overall health was SERVING at "
        f"the last check (every {HEALTH_EVERY_S:g} s, as readiness probes take a pod out of "
        f"a Service); a transport error (UNAVAILABLE, DEADLINE_EXCEEDED) is retried once on "
        f"the other front end; an unacknowledged LogEvents is sent again with its "
        f"request_id (backoff 0.2 s doubling to 2 s) until acknowledged.\n\n"
        f"Peak before the faults: **{p['qps']:.1f} QPS** ({p['clients']} clients, "
        f"{p['seconds']:g} s closed loop, Recommend only, beam 128), p50 {_fmt(p['p50_ms'])} ms, "
        f"p99 {_fmt(p['p99_ms'])} ms.\n\n"
        f"## Faults\n\n{_table(r['faults'], FAULT_COLS)}\n"
        f"Each row counts the calls that returned from the fault's instant until "
        f"{cfg['settle_s']:g} s after it recovered: sent = model + fallback + events acked + "
        f"failed (a LogEvents refused while Redis is down is a failed call, and is sent again). "
        f"*retried*: calls retried on the other front end. *acked lost*: acknowledged events "
        f"(all so far, {r['faults'][-1]['acked_checked']} after the last fault) not in Redis once "
        f"the fault was over. *recovery s*: from the fault's instant (the signal) until:\n\n"
        f"{meanings}\n"
        f"Steady windows ({cfg['steady_s']:g} s before each fault):\n\n"
        f"{_table(steady, FAULT_COLS[:7])}\n"
        f"## Soak\n\nOpen loop at **{s['offered_qps']:.1f} QPS offered** (half the peak; "
        f"Recommend and LogEvents in the same mix) for {s['seconds']:g} s after a "
        f"{s['warmup_s']:g} s warm-up; latency counts from each call's scheduled time.\n\n"
        f"- achieved {s['achieved_qps']:.2f} QPS; Recommend p50 {_fmt(s['p50_ms'])} ms, "
        f"p99 {_fmt(s['p99_ms'])} ms\n"
        f"- {s['sent']} calls: {s['model']} model, {s['events_acked']} events acked; "
        f"**errors {s['errors']}** ({s['failed']} failed, {s['fallback']} fallbacks)\n"
        f"- acknowledged events at the end: {r['events']['checked']}, lost "
        f"**{r['events']['lost']}**, duplicated {r['events']['duplicated']}; never acknowledged "
        f"{r['events']['unacknowledged']}\n\n"
        f"![p99 over the soak](chaos_p99.png)\n\n"
        f"RSS at the soak's start and end (target: growth under "
        f"{cfg['max_rss_growth_pct']:g}%):\n\n"
        f"{_table(s['rss'], ['process', 'pid', 'start_mib', 'end_mib', 'growth_pct'])}\n"
        f"{_spread(s['buckets'], cfg['bucket_s'])}\n\n"
        f"## Verdict\n\n{verdict}"
    )


def _spread(rows: list[dict], width: float) -> str:
    """The soak's buckets in a sentence (each is in chaos.json and the plot)."""
    qps = [r["qps"] for r in rows]
    p99 = sorted((r["p99_ms"], r["t_s"]) for r in rows if r["p99_ms"] is not None)
    latency = (
        f"Recommend p99 from {_fmt(p99[0][0])} ms to {_fmt(p99[-1][0])} ms (at {p99[-1][1]:g} s)"
        if p99
        else "no Recommend answered by the model"
    )
    return (
        f"Per {width:g} s bucket (`soak.buckets` in chaos.json): answered QPS "
        f"{min(qps):.1f} to {max(qps):.1f}; {latency}; errors {sum(r['errors'] for r in rows)}."
    )


def _details(f: dict) -> str:
    d = f["detail"]
    if f["fault"] == "frontend_kill":
        return f"A's process started again {d['restarted_after_s']:.2f} s after the signal."
    if f["fault"] == "triton_kill":
        return f"tritonserver pid {d['killed_pid']} killed; pid {d['new_pid']} serves now."
    if f["fault"] == "redis_crash":
        during = ", ".join(f"{k} {v}" for k, v in sorted(d["during_outage"].items()))
        health = ", ".join(
            f"{k} {_fmt(v)} s" for k, v in d["store_health_not_serving_after_s"].items()
        )
        return (
            f"Down {d['down_s']:.1f} s; the restart (AOF replay) took {d['restart_s']:.2f} s. "
            f"Calls sent and answered while it was down: {during or 'none'}. "
            f"`onerec.FeatureStore` health NOT_SERVING after: {health} (blank: not seen)."
        )
    return (
        f"NOT_SERVING after {_fmt(d['not_serving_after_s'])} s; A answered "
        f"{d['answered_by_A_while_draining']} calls while draining and exited with "
        f"{d['exit_code']} after {d['exited_after_s']:.2f} s."
    )


# -- main --------------------------------------------------------------------------------


def exercise(stack: Stack, users: list[str], items: list[str], args: argparse.Namespace) -> dict:
    """Peak, the faults and the soak against a running stack."""
    load = Load(Fleet(stack.addresses), users, items, args.timeout_s)
    probe = Probe(stack.addresses, load)
    load.start()
    try:
        say(f"warming {len(users)} users' lifelong caches on A and B")
        warm(stack.addresses, users)
        peak = measure_peak(load, args.peak_clients, args.peak_s)
        if not peak["qps"]:
            raise RuntimeError(f"the model answered nothing in {args.peak_s:g} s: {peak}")
        say(f"peak {peak['qps']:.1f} QPS (p99 {_fmt(peak['p99_ms'])} ms)")
        with closed_loop(load, args.clients, args.log_share):
            faults = [run_fault(name, stack, probe, load, args) for name in FAULTS]
        warm(stack.addresses, users)  # A restarted: its cache is cold
        rate = peak["qps"] / 2
        out = {"peak": peak, "faults": faults, "soak": soak(stack, load, rate, args)}
        unacknowledged = load.settle(args.recovery_timeout_s)
        out["events"] = check_events(stack.redis.url(), load.acked_so_far())
        out["events"]["unacknowledged"] = unacknowledged
        out["illegal_items"] = sum(
            scrape(f.metrics_port).get(("onerec_illegal_items", ()), 0.0) for f in stack.fronts
        )
        return out
    finally:
        load.stop()
        load.fleet.close()
        probe.close()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/synthetic"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=30.0, help="open loop before the soak")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients during faults")
    p.add_argument("--peak-clients", type=int, default=8)
    p.add_argument("--peak-s", type=float, default=15.0)
    p.add_argument("--steady-s", type=float, default=10.0, help="load before each fault")
    p.add_argument("--settle-s", type=float, default=5.0, help="counted after each recovery")
    p.add_argument("--redis-down-s", type=float, default=5.0)
    p.add_argument("--recovery-timeout-s", type=float, default=180.0)
    p.add_argument("--users", type=int, default=200, help="the users the load draws from")
    p.add_argument("--log-share", type=float, default=0.2, help="LogEvents' share of calls")
    p.add_argument("--timeout-s", type=float, default=2.0, help="each call's deadline")
    p.add_argument("--bucket-s", type=float, default=10.0, help="the soak's time buckets")
    p.add_argument("--peak-flops", type=float, help="for the front ends' MFU (default: measured)")
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    peak_flops = args.peak_flops or measure_peak_flops()
    ds = Dataset.load(args.artifacts / "data")
    rng = np.random.default_rng(args.seed)
    all_users = ds.users["user_id"].astype(str).to_numpy()
    users = rng.choice(all_users, min(args.users, len(all_users)), replace=False).tolist()
    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "cores": os.cpu_count(),
        "peak_flops": peak_flops,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"users": len(ds.users), "events": len(ds.events)},
    }
    workdir = Path(tempfile.mkdtemp(prefix="onerec-chaos-"))
    try:
        with Stack(args, ds, peak_flops, workdir) as stack:
            report |= exercise(stack, users, ds.items["item_id"].astype(str).tolist(), args)
    except BaseException:
        say(f"failed; the processes' logs are in {workdir}")
        raise
    logs = args.out / "chaos_logs"  # what the servers said during the faults
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    for log in [*workdir.glob("*.log"), workdir / "redis" / "redis.log"]:
        shutil.copy(log, logs / log.name)
    shutil.rmtree(workdir, ignore_errors=True)
    report["problems"] = problems(report, args.max_rss_growth_pct)
    (args.out / "chaos.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "chaos_p99.png")
    (args.out / "chaos.md").write_text(markdown(report))
    print((args.out / "chaos.md").read_text())
    for x in report["problems"]:
        print(f"PROBLEM: {x['problem']}", file=sys.stderr)
    return 3 if report["problems"] else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on `kill` too
    sys.exit(main())
