"""The ``onerec.v1.Recommender`` servicer: validate, build pathways, decode, map, answer.

Recommend, stage by stage (each timed into ``onerec_stage_latency_seconds``):

1. admission: beyond ``max_inflight`` concurrent calls, RESOURCE_EXHAUSTED at once;
2. validation of every field (INVALID_ARGUMENT naming the field);
3. features: profile, last events, positive events (feature store, in a worker thread);
4. lifelong: the cached or fresh k-means compression of the whole history;
5. triton: the ``onerec`` ensemble, bounded by the caller's remaining deadline;
6. catalog: SIDs -> items with the decoder's own catalog version, seen and excluded
   items removed, topped up from popularity if filtering left fewer than ``count``.

Fallbacks answer instead of failing: an unknown user gets popular items
(``cold_start``); a Triton that is down, late or not ready gets popular items minus the
user's seen ones (``model_unavailable``). Both are counted, and the model is used again
as soon as the health loop's probe succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np

from onerec.engagement import is_positive
from onerec.model import OneRecConfig, flops_per_request
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.catalog import CatalogReader, CatalogView
from server.feature_store import EventRow, FeatureStore
from server.metrics import Metrics
from server.pathway_builder import PathwayBuilder
from server.triton_client import TritonModel, TritonRejected, TritonUnavailable
from server.validation import (
    Invalid,
    Limits,
    check_log_events,
    check_recommend,
    event_flags,
    inline_history,
)

log = logging.getLogger(__name__)
DEFAULT_DEADLINE_S = 2.0  # Triton's budget when the caller set no deadline


@dataclass
class Context:
    """What a request needs, built once at start-up (server/app.py)."""

    cfg: OneRecConfig
    store: FeatureStore
    builder: PathwayBuilder
    catalog: CatalogReader
    model: TritonModel
    metrics: Metrics
    limits: Limits
    item_index: dict[str, int]  # item id -> the model's item index
    durations: np.ndarray  # (n_items,) ms, for inline and logged events
    model_name: str
    max_inflight: int


class Unavailable(Exception):
    pass


class RecommenderService(pb_grpc.RecommenderServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.inflight = 0
        self.model_ready = False  # set by the health loop's probe

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, method: str, handler, request, context: grpc.aio.ServicerContext):
        m = self.ctx.metrics
        if self.inflight >= self.ctx.max_inflight:
            m.shed.inc()
            m.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"over {self.ctx.max_inflight} calls in flight; retry with backoff",
            )
        self.inflight += 1
        m.inflight.inc()
        started = time.perf_counter()
        code = "OK"
        try:
            return await handler(request, context)
        except Invalid as e:
            code = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Unavailable as e:
            code = "UNAVAILABLE"
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            if context.code() is None:  # not an abort of ours
                code = "INTERNAL"
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise
        finally:
            self.inflight -= 1
            m.inflight.dec()
            m.requests.labels(method, code).inc()
            m.latency.labels(method).observe(time.perf_counter() - started)

    async def Recommend(self, request, context):
        return await self._call("Recommend", self._recommend, request, context)

    async def LogEvents(self, request, context):
        return await self._call("LogEvents", self._log_events, request, context)

    # -- Recommend --------------------------------------------------------------------

    async def _recommend(self, request, context) -> pb.RecommendResponse:
        ctx, m = self.ctx, self.ctx.metrics
        now_ms = int(time.time() * 1000)
        count, beam = check_recommend(request, ctx.limits, now_ms)
        user = request.user_id
        inline = inline_history(request.events, ctx.item_index, ctx.durations)
        excluded = np.array(
            [*request.exclude_item_ids, *(e.item_id for e in request.events)], dtype=str
        )
        static, version = await asyncio.to_thread(self._profile, user)
        view = await asyncio.to_thread(ctx.catalog.get)
        if static is None and version == 0 and not len(inline):
            return self._fallback(
                view, "cold_start", np.zeros(0, np.int64), excluded, count, request.request_id
            )
        if static is None:  # a user known only by events they logged: default profile
            static = np.zeros(len(ctx.cfg.static_cardinalities), np.int64)
        built = await asyncio.to_thread(ctx.builder.build, user, now_ms, static, inline)
        pathways, seen = built.pathways, built.seen
        excluded = np.concatenate([excluded, built.seen_new])
        m.stage.labels("features").observe(built.features_s)
        if built.lifelong_s:
            m.stage.labels("lifelong").observe(built.lifelong_s)
        if not self.model_ready:
            return self._fallback(
                view, "model_unavailable", seen, excluded, count, request.request_id
            )
        recent = np.concatenate([pathways["short_items"], pathways["pos_items"]]) - 1
        avoid = np.concatenate([view.rows_of(excluded), view.rows_of_model(recent)])
        started = time.perf_counter()
        remaining = context.time_remaining()
        timeout = min(DEFAULT_DEADLINE_S, remaining - 0.005 if remaining else DEFAULT_DEADLINE_S)
        try:
            decoded = await ctx.model.recommend(
                pathways, beam, beam, view.exclusion_sids(avoid), timeout
            )
            answer = await asyncio.to_thread(ctx.catalog.get, decoded.catalog_version)
        except TritonUnavailable as e:
            log.warning("triton unavailable for %s: %s", user, e)
            return self._fallback(
                view, "model_unavailable", seen, excluded, count, request.request_id
            )
        except TritonRejected as e:
            log.error("triton rejected a request the front end validated: %s", e)
            raise
        except (OSError, ValueError) as e:  # the decoder's catalog version is unreadable
            log.error("catalog for the decoder's answer unavailable: %s", e)
            return self._fallback(
                view, "model_unavailable", seen, excluded, count, request.request_id
            )
        finally:
            m.stage.labels("triton").observe(time.perf_counter() - started)
        started = time.perf_counter()
        rows, scores, illegal = answer.rank(decoded.sids, decoded.scores, seen, excluded, count)
        if illegal:
            m.illegal.inc(illegal)
            log.error("%d decoded SIDs map to no item in catalog v%d", illegal, answer.version)
        if answer.version != view.version:  # the decoder lags the live catalog: never
            live = view.holds(answer.item_ids[rows])  # return what it has since removed
            rows, scores = rows[live], scores[live]
        ids, sids = answer.item_ids[rows], answer.sids[rows]
        if len(rows) < count:  # filtering ate beams: top up with popular unseen items
            fill = view.popular(seen, np.concatenate([excluded, ids]), count - len(rows))
            ids = np.concatenate([ids, view.item_ids[fill]])
            sids = np.concatenate([sids, view.sids[fill]])
            scores = np.concatenate([scores, np.full(len(fill), -np.inf, np.float32)])
        m.stage.labels("catalog").observe(time.perf_counter() - started)
        flops = flops_per_request(ctx.cfg, beam, len(pathways["life_items"]))
        m.flops.inc(flops)
        m.window.add(flops)
        return self._response(ids, scores, sids, view.version, "", request.request_id)

    def _profile(self, user: str) -> tuple[np.ndarray | None, int]:
        return self.ctx.store.static(user), self.ctx.store.version(user)

    def _fallback(self, view: CatalogView, reason: str, seen, excluded, count, request_id):
        self.ctx.metrics.fallback.labels(reason).inc()
        self.ctx.metrics.window.add(0.0)
        rows = view.popular(seen, excluded, count)
        scores = np.log1p(np.arange(len(rows), 0, -1, dtype=np.float32))  # rank-based
        return self._response(
            view.item_ids[rows], scores, view.sids[rows], view.version, reason, request_id
        )

    def _response(self, ids, scores, sids, version: int, degraded: str, request_id: str):
        items = [
            pb.RecommendedItem(item_id=str(item), score=float(score), semantic_id=sid.tolist())
            for item, score, sid in zip(ids, scores, sids, strict=True)
        ]
        return pb.RecommendResponse(
            items=items,
            model_version=f"{self.ctx.model_name}:catalog-v{version}",
            degraded=degraded,
            request_id=request_id,
        )

    # -- LogEvents --------------------------------------------------------------------

    async def _log_events(self, request, context) -> pb.LogEventsResponse:
        ctx = self.ctx
        check_log_events(request, ctx.limits, int(time.time() * 1000))
        h = inline_history(request.events, ctx.item_index, ctx.durations)
        ids = sorted(request.events, key=lambda e: e.timestamp_ms)
        positive = is_positive(h.scores())
        rows = [
            EventRow(
                e.item_id,
                int(h.items[i]),
                int(h.timestamp[i]),
                int(h.watch_ms[i]),
                int(h.duration_ms[i]),
                event_flags(e),
                bool(positive[i]),
            )
            for i, e in enumerate(ids)
        ]
        accepted = await asyncio.to_thread(
            ctx.store.append, request.user_id, rows, request.request_id
        )
        return pb.LogEventsResponse(accepted=accepted)
