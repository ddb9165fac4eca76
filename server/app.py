"""The front end's process: settings, start-up, health, and graceful shutdown.

Start-up loads from the Triton model repository the model's config, its items, the
ranking stage's item table and the catalog, and opens the feature store. The gRPC
server carries the Recommender service, ``grpc.health.v1`` and reflection, with optional
TLS, an optional bearer token and message-size limits.

Health of ``onerec.v1.Recommender`` is SERVING only while a real tiny inference through
Triton succeeds: a loop probes every ``probe_interval_s`` and flips both that status and
the service's ``model_ready`` (which routes requests to the popularity fallback while
Triton is away, and back when it returns). The same loop pings the feature store and
reports it as the health service ``onerec.FeatureStore``; both dependencies are also the
gauge ``onerec_dependency_up``. With a local Triton (``onerec serve`` alone), its
supervisor restarts a Triton that dies and counts ``onerec_triton_restarts_total``.

The overall status ``""`` says the process can answer, the fallback included (Kubernetes
routes and restarts on it), so a Triton or Redis outage neither empties the Service nor
restarts healthy front ends. SIGTERM sets every status NOT_SERVING, keeps answering for
``drain_s`` (so load balancers stop sending first), lets in-flight calls finish within
``grace_s``, then exits.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from onerec.runtime.config import OneRecConfig
from onerec.runtime.layout import (
    ENCODER,
    ITEM_TABLE,
    MODEL_ITEMS,
    REWARD,
    REWARD_JSON,
    catalog_dir,
)
from onerec.runtime.model_items import ModelItems
from onerec.runtime.reward import RewardMeta
from onerec.v1 import recommender_pb2
from server.catalog import CatalogReader
from server.feature_store import StoreUnavailable, open_store
from server.metrics import Metrics, measure_peak_flops
from server.pathway_builder import PathwayBuilder
from server.service import Context, RecommenderService, add_to_server
from server.triton_client import TritonModel
from server.triton_supervisor import TritonSupervisor
from server.validation import Limits

log = logging.getLogger(__name__)
SERVICE = "onerec.v1.Recommender"
STORE_HEALTH = "onerec.FeatureStore"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
PROBE_FAILURES = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


@dataclass
class Settings:
    """Every setting has a flag (onerec serve) and an environment variable."""

    artifacts: Path = field(
        default_factory=lambda: Path(_env("ONEREC_ARTIFACTS", "artifacts/synthetic"))
    )
    repository: Path = field(
        default_factory=lambda: Path(_env("ONEREC_REPOSITORY", "model_repository"))
    )
    triton_url: str = field(default_factory=lambda: _env("ONEREC_TRITON_URL", "127.0.0.1:8001"))
    # A redis:// URL (shared by every front end) or a SQLite file's path.
    feature_store: str | None = field(default_factory=lambda: _env("ONEREC_FEATURE_STORE"))
    port: int = field(default_factory=lambda: int(_env("ONEREC_PORT", "50051")))
    metrics_port: int = field(default_factory=lambda: int(_env("ONEREC_METRICS_PORT", "9464")))
    max_inflight: int = field(default_factory=lambda: int(_env("ONEREC_MAX_INFLIGHT", "64")))
    auth_token_file: str | None = field(default_factory=lambda: _env("ONEREC_AUTH_TOKEN_FILE"))
    tls_cert: str | None = field(default_factory=lambda: _env("ONEREC_TLS_CERT"))
    tls_key: str | None = field(default_factory=lambda: _env("ONEREC_TLS_KEY"))
    peak_flops: float | None = field(
        default_factory=lambda: float(v) if (v := _env("ONEREC_PEAK_FLOPS")) else None
    )
    probe_interval_s: float = field(
        default_factory=lambda: float(_env("ONEREC_PROBE_INTERVAL_S", "2.0"))
    )
    drain_s: float = field(default_factory=lambda: float(_env("ONEREC_DRAIN_S", "0")))
    grace_s: float = field(default_factory=lambda: float(_env("ONEREC_GRACE_S", "10")))
    limits: Limits = field(
        default_factory=lambda: Limits(max_count=int(_env("ONEREC_MAX_COUNT", "100")))
    )
    # Order answers by the reward model where the repository has one (a request may ask
    # for either order); off: the generator's order unless a request asks otherwise.
    reward_selection: bool = field(
        default_factory=lambda: _env("ONEREC_REWARD_SELECTION", "1") not in ("0", "false", "off")
    )

    def store(self) -> str:
        return str(self.feature_store or self.artifacts / "features.sqlite")


class BearerToken(grpc.aio.ServerInterceptor):
    """Rejects Recommender calls without ``authorization: Bearer <token>``; health and
    reflection stay open for probes."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(f"/{SERVICE}/"):
            metadata = dict(details.invocation_metadata or ())
            given = metadata.get("authorization", "")
            if not hmac.compare_digest(given.encode(), self.expected.encode()):
                return self._deny
        return await continuation(details)


def model_name(repository: Path) -> str:
    """A short content hash of the served encoder: changes with every new model."""
    digest = hashlib.sha256((repository / ENCODER / "1" / "encoder.onnx").read_bytes())
    return f"onerec-{digest.hexdigest()[:10]}"


def build_context(s: Settings, model: TritonModel, metrics: Metrics) -> Context:
    encoder = s.repository / ENCODER / "1"
    cfg = OneRecConfig(**json.loads((encoder / "model.json").read_text()))
    items = ModelItems.load(encoder / MODEL_ITEMS)
    if len(items.item_ids) != cfg.n_items:
        raise ValueError(
            f"{encoder}: {len(items.item_ids)} items but the model has {cfg.n_items}: "
            "they come from different builds"
        )
    table = np.load(encoder / ITEM_TABLE)
    if table.shape != (cfg.n_items + 2, cfg.d_model):
        raise ValueError(f"{s.repository}: item table {table.shape} does not fit the model")
    store = open_store(s.store())
    item_index = items.index()
    reward = None
    if (meta := s.repository / REWARD / "1" / REWARD_JSON).is_file():
        reward = RewardMeta.load(meta)
        if reward.n_items != cfg.n_items:
            raise ValueError(f"{meta}: a reward model of {reward.n_items} items, not {cfg.n_items}")
    return Context(
        cfg=cfg,
        store=store,
        builder=PathwayBuilder(store, cfg, items.vectors),
        catalog=CatalogReader(catalog_dir(s.repository), item_index, table),
        model=model,
        metrics=metrics,
        limits=s.limits,
        item_index=item_index,
        durations=items.duration_ms,
        model_name=model_name(s.repository),
        max_inflight=s.max_inflight,
        reward=reward,
        reward_selection=s.reward_selection,
    )


class FrontEnd:
    """The running gRPC server with its health loop; ``await start()`` then ``wait()``."""

    def __init__(self, settings: Settings, triton: TritonSupervisor | None = None) -> None:
        self.s = settings
        self.metrics = Metrics(settings.peak_flops or measure_peak_flops())
        if triton is not None:
            triton.on_restart.append(self.metrics.triton_restarts.inc)
        self.model = TritonModel(settings.triton_url)
        self.ctx = build_context(settings, self.model, self.metrics)
        self.service = RecommenderService(self.ctx)
        self.health = health.aio.HealthServicer()
        self._probe_task: asyncio.Task | None = None
        self._failures = 0
        self.port = 0

    async def start(self) -> None:
        s = self.s
        interceptors = []
        if s.auth_token_file:
            token = Path(s.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"{s.auth_token_file}: the bearer token file is empty")
            interceptors.append(BearerToken(token))
        if bool(s.tls_cert) != bool(s.tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        add_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        address = f"0.0.0.0:{s.port}"
        if s.tls_cert and s.tls_key:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())]
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # process liveness
        self.service.model_ready = True  # so that the first probe's outcome is logged
        await self._set_health(await self.model.probe(self.ctx.cfg))
        await self._check_store()
        self.ctx.catalog.get()  # load the live catalog before the first call
        # What start-up loaded lives as long as the process: keep it out of every later
        # collection, whose full passes would otherwise walk it and stall all requests.
        gc.collect()
        gc.freeze()
        self.metrics.watch_gc()
        await self.server.start()
        self.metrics.serve(s.metrics_port)
        self._probe_task = asyncio.create_task(self._probe_loop())
        log.info(
            "serving %s on :%d (metrics :%d), triton %s, model ready: %s",
            SERVICE,
            self.port,
            s.metrics_port,
            s.triton_url,
            self.service.model_ready,
        )

    async def _observe_probe(self, ok: bool) -> None:
        """Down after ``PROBE_FAILURES`` failed probes in a row, up after one success: one
        slow probe under load must not send everyone to the fallback."""
        self._failures = 0 if ok else self._failures + 1
        if ok or self._failures >= PROBE_FAILURES:
            await self._set_health(ok)

    async def _set_health(self, ready: bool) -> None:
        if ready != self.service.model_ready:
            log.warning("model %s", "ready" if ready else "unavailable: serving fallbacks")
        self.service.model_ready = ready
        self.metrics.dependency_up.labels("triton").set(ready)
        await self.health.set(SERVICE, _status(ready))

    async def _check_store(self) -> None:
        """Ping the feature store; its health entry, its gauge and whether requests use it
        (``store_ready``, which a failed request also clears) follow the answer."""
        was_up = self.service.store_ready
        try:
            await asyncio.to_thread(self.ctx.store.ping)
            up = True
        except StoreUnavailable as e:
            up = False
            if was_up:
                log.warning("feature store unavailable: %s", e)
        if up and not was_up:
            log.warning("feature store available again")
        self.service.store_ready = up
        self.metrics.dependency_up.labels("feature_store").set(up)
        await self.health.set(STORE_HEALTH, _status(up))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.probe_interval_s)
            try:
                await self._observe_probe(await self.model.probe(self.ctx.cfg))
                await self._check_store()
            except Exception:  # the loop must outlive any surprise
                log.exception("health probe failed unexpectedly")

    async def stop(self) -> None:
        """NOT_SERVING first, so load balancers drain us; then finish in-flight calls."""
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.s.drain_s > 0:  # still answering while load balancers notice NOT_SERVING
            log.info("draining for %.1fs", self.s.drain_s)
            await asyncio.sleep(self.s.drain_s)
        await self.server.stop(self.s.grace_s)
        await self.model.close()
        self.metrics.close()
        self.ctx.builder.refresher.close()
        self.ctx.store.close()
        log.info("front end stopped")

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _status(up: bool) -> int:
    return (
        health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
    )


async def serve(
    settings: Settings, stop: asyncio.Event | None = None, triton: TritonSupervisor | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or ``stop``), then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    front = FrontEnd(settings, triton)
    await front.start()
    user = front.ctx.store.any_user() or "u0"
    print(
        f"\nOneRec is serving.\n"
        f"  gRPC     localhost:{front.port}  (onerec.v1.Recommender, grpc.health.v1, reflection)\n"
        f"  metrics  http://localhost:{settings.metrics_port}/metrics\n"
        f"  try      .venv/bin/onerec recommend --user {user} --address localhost:{front.port}\n"
        f'           grpcurl -plaintext -d \'{{"user_id": "{user}", "count": 5}}\' '
        f"localhost:{front.port} onerec.v1.Recommender/Recommend\n"
        f"  stop     Ctrl-C\n",
        flush=True,
    )
    await stop.wait()
    await front.stop()
