"""The ``onerec.v1.Recommender`` servicer: validate, build pathways, decode, map, answer.

Recommend, stage by stage (each timed into ``onerec_stage_latency_seconds``):

1. admission: beyond ``max_inflight`` concurrent calls, RESOURCE_EXHAUSTED at once;
2. validation of every field (INVALID_ARGUMENT naming the field);
3. features: profile, last events, positive events (a store whose reads wait on the
   network, Redis, is read from a worker thread);
4. lifelong: the cached or fresh k-means compression of the whole history;
5. triton: the ``onerec`` ensemble, bounded by the caller's remaining deadline;
6. catalog: SIDs -> items with the decoder's own catalog version, seen and excluded
   items removed;
7. reward: where the model has a reward model and the request or the server's setting
   asks for it, the reward model (its own Triton model) scores every candidate, and the
   P-Score blended with the SID's log-probability orders them; otherwise, or when the
   reward model does not answer in time, the generator's order does: the SID
   log-probability plus the user vector's score (onerec.runtime.ranking). The answer is
   topped up from popularity if filtering left fewer than ``count``.

Fallbacks answer instead of failing: an unknown user gets popular items
(``cold_start``); a feature store that does not answer gets popular items minus the
request's own exclusions (``feature_store_unavailable``: the user's history is out of
reach); a Triton that is down, late or not ready gets popular items minus the user's seen
ones (``model_unavailable``). All are counted, and the model is used again as soon as the
health loop's probe succeeds.

LogEvents acknowledges only what the store committed: a store that does not answer gets
UNAVAILABLE, and the client retries (with the same ``request_id``, applied once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from onerec.runtime.config import OneRecConfig
from onerec.runtime.engagement import is_positive
from onerec.runtime.pathways import request_flops
from onerec.runtime.ranking import FINAL_EXPAND, rank_by_reward, rank_candidates
from onerec.runtime.reward import RewardMeta
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.catalog import CatalogReader, CatalogView
from server.feature_store import EventRow, FeatureStore, StoreUnavailable
from server.metrics import Metrics
from server.pathway_builder import Built, PathwayBuilder
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
DEFAULT_DEADLINE_S = 2.0  # Triton's budget when the caller set no deadline (and its cap)
MIN_RESERVE_S, MAX_RESERVE_S = 0.01, 0.05  # kept back from Triton to answer by the deadline


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
    reward: RewardMeta | None = None  # None: the model has no reward model
    reward_selection: bool = True  # the default order: by the reward model where there is one


class Throttled:
    """One log line per ``every_s`` at most: an outage at hundreds of calls a second must
    not write hundreds of lines a second. A line after a quiet spell is the call's own; a
    later one also says how many calls went unlogged since the last line."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last = -every_s
        self._unlogged = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._unlogged += 1
            return
        if self._unlogged:
            message += f" (and {self._unlogged} more failed calls since the last such line)"
        log.warning(message, *args)
        self._last, self._unlogged = now, 0


class Unavailable(Exception):
    """Nothing can answer (no readable live catalog, not even for a fallback), or a
    LogEvents cannot be stored."""


@dataclass(frozen=True)
class Prepared:
    """A Recommend's inputs to the model."""

    view: CatalogView  # the live catalog when the request arrived
    built: Built | None  # None: the fallback answers, for ``fallback``'s reason
    seen: np.ndarray  # model indices the user has seen
    excluded: np.ndarray  # ids never to return: requested, inline, unknown to the model
    exclude_sids: np.ndarray | None  # SIDs the decoder must not return
    fallback: str = ""  # cold_start | feature_store_unavailable, when built is None


@dataclass(frozen=True)
class Found:
    """Decoded SIDs as the answer's candidate items, before the final ranking."""

    answer: CatalogView  # the catalog version that decoded them
    rows: np.ndarray  # allowed items, beam order
    logp: np.ndarray  # each one's SID log-probability
    tokens: np.ndarray  # each one's model item token (what both ranking stages read)


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes are not its message: answered INVALID_ARGUMENT (grpc would
    answer a failed deserializer with UNKNOWN)."""

    message: str  # the message type expected
    error: str


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Malformed(message_type.DESCRIPTOR.full_name, str(e))

    return parse


def triton_budget(remaining: float | None) -> float:
    """Seconds Triton may take: the caller's deadline less a reserve for the fallback and
    the catalog step, capped; 0 or less means no time (the fallback answers at once).
    grpc reports an expired deadline as 0 remaining and no deadline as None."""
    if remaining is None:
        return DEFAULT_DEADLINE_S
    reserve = min(MAX_RESERVE_S, max(MIN_RESERVE_S, 0.1 * remaining))
    return min(DEFAULT_DEADLINE_S, remaining - reserve)


def below(scores: np.ndarray, n: int) -> np.ndarray:
    """``n`` finite scores ranked under ``scores`` (JSON has no -inf): for top-up items."""
    floor = float(scores.min()) if len(scores) else 0.0
    return (floor - 1.0 - np.arange(n)).astype(np.float32)


class RecommenderService(pb_grpc.RecommenderServicer):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.inflight = 0
        self.model_ready = False  # set by the health loop's probe
        # False from a store failure until the health loop's ping succeeds: a store that
        # hangs then costs one timeout, not one per call.
        self.store_ready = True
        self._triton_down_log, self._store_down_log = Throttled(), Throttled()
        self._reward_down_log = Throttled()

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
            if isinstance(request, Malformed):
                raise Invalid(f"request: not a valid {request.message}: {request.error}")
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
        by_reward = self._by_reward(request.ranking)
        inline = inline_history(request.events, ctx.item_index, ctx.durations)
        excluded = np.array(
            [*request.exclude_item_ids, *(e.item_id for e in request.events)], dtype=str
        )
        try:
            view = await self._view()
        except (OSError, ValueError) as e:
            raise Unavailable(f"no live catalog: {e}") from e
        args = (view, request.user_id, now_ms, inline, excluded)
        # Reads that may wait on the network (Redis) go to a worker thread. SQLite's run
        # here: the two thread switches a hop costs outweigh the reads themselves.
        if ctx.store.reads_wait:
            prep = await asyncio.to_thread(self._prepare, *args)
        else:
            prep = self._prepare(*args)
        if prep.built is None or not self.model_ready:
            reason = prep.fallback or "model_unavailable"
            return await self._fallback(prep, reason, count, request.request_id)
        pathways = prep.built.pathways
        # The ranking head orders FINAL_EXPAND x the beams' SIDs, free to decode; the
        # P-Score costs per candidate, so the reward model scores the beams alone.
        sids = beam if by_reward else FINAL_EXPAND * beam
        started = time.perf_counter()
        try:
            decoded = await ctx.model.recommend(
                pathways, beam, sids, prep.exclude_sids, triton_budget(context.time_remaining())
            )
        except TritonUnavailable as e:
            self._triton_down_log.warning("triton unavailable: %s", e)
            return await self._fallback(prep, "model_unavailable", count, request.request_id)
        except TritonRejected as e:
            log.error("triton rejected a request the front end validated: %s", e)
            raise
        finally:
            m.stage.labels("triton").observe(time.perf_counter() - started)
        flops = request_flops(ctx.cfg, beam, pathways)
        started = time.perf_counter()
        try:
            # The catalog that decoded them maps them; the mapping is a few vector
            # operations, done here rather than paying for a thread hop.
            found = self._found(prep, await self._view(decoded.catalog_version), decoded)
            pscore, catalog_s = None, 0.0
            if by_reward:
                catalog_s = time.perf_counter() - started
                pscore = await self._pscore(pathways, found, context)
                if pscore is not None:
                    flops += ctx.reward.flops(len(found.rows), len(pathways["short_items"]))
                started = time.perf_counter()
            ids, scores, sids, ranking = self._answer(prep, found, decoded.user, pscore, count)
        except (OSError, ValueError) as e:  # the decoder's catalog version is unreadable
            log.error("catalog v%d unavailable: %s", decoded.catalog_version, e)
            return await self._fallback(prep, "model_unavailable", count, request.request_id)
        m.stage.labels("catalog").observe(catalog_s + time.perf_counter() - started)
        m.flops.inc(flops)
        m.window.add(flops)
        version = decoded.catalog_version  # the catalog that decoded and mapped them
        return self._response(ids, scores, sids, version, "", request.request_id, ranking)

    async def _view(self, version: int | None = None) -> CatalogView:
        """A catalog version (the live one by default): loaded already, after a stat, or
        loaded now on a worker thread, as a publish's first request does."""
        catalog = self.ctx.catalog
        return catalog.cached(version) or await asyncio.to_thread(catalog.get, version)

    def _by_reward(self, ranking: int) -> bool:
        """Whether the reward model orders this answer: the request's choice, else the
        server's setting, where the model has a reward model."""
        if ranking == pb.RANKING_GENERATION:
            return False
        if ranking == pb.RANKING_REWARD:
            if self.ctx.reward is None:
                raise Invalid("ranking: RANKING_REWARD, but the served model has no reward model")
            return True
        return self.ctx.reward is not None and self.ctx.reward_selection

    async def _pscore(self, pathways, found: Found, context) -> np.ndarray | None:
        """The candidates' P-Scores, or None (the generator's order answers) when the
        reward model does not answer in time."""
        if not len(found.rows):
            return None
        m = self.ctx.metrics
        started = time.perf_counter()
        try:
            return await self.ctx.model.reward(
                pathways,
                found.tokens,
                self.ctx.reward.pos_len,
                triton_budget(context.time_remaining()),
            )
        except TritonUnavailable as e:
            m.reward_skipped.inc()
            self._reward_down_log.warning("reward model unavailable: %s", e)
            return None
        finally:
            m.stage.labels("reward").observe(time.perf_counter() - started)

    def _prepare(
        self, view: CatalogView, user: str, now_ms: int, inline, excluded: np.ndarray
    ) -> Prepared:
        """Profile and the four pathways, with what the search must exclude."""
        ctx, m = self.ctx, self.ctx.metrics
        none = np.zeros(0, np.int64)
        if not self.store_ready:
            return Prepared(view, None, none, excluded, None, "feature_store_unavailable")
        started = time.perf_counter()
        try:
            static, version = ctx.store.static(user), ctx.store.version(user)
            profile_s = time.perf_counter() - started
            if static is None and version == 0 and not len(inline):
                return Prepared(view, None, none, excluded, None, "cold_start")
            if static is None:  # a user known only by events they logged: default profile
                static = np.zeros(len(ctx.cfg.static_cardinalities), np.int64)
            built = ctx.builder.build(user, now_ms, static, inline, version=version)
        except StoreUnavailable as e:
            self._store_failed("Recommend", e)
            return Prepared(view, None, none, excluded, None, "feature_store_unavailable")
        m.stage.labels("features").observe(profile_s + built.features_s)
        m.stage.labels("lifelong").observe(built.lifelong_s)
        excluded = np.concatenate([excluded, built.seen_new])
        # Every seen item (up to SEEN_LIMIT, the most recent) is excluded inside the search,
        # so beams go to unseen items rather than being dropped after decoding.
        avoid = np.concatenate([view.rows_of(excluded), view.rows_of_model(built.seen)])
        return Prepared(view, built, built.seen, excluded, view.exclusion_sids(avoid))

    def _found(self, prep: Prepared, answer: CatalogView, decoded) -> Found:
        """Decoded SIDs -> the allowed items they reach in ``answer``, the decoder's own
        catalog version, less any the live catalog has removed since."""
        m, view = self.ctx.metrics, prep.view
        rows, logp, illegal = answer.candidates(
            decoded.sids, decoded.scores, prep.seen, prep.excluded
        )
        if illegal:
            m.illegal.inc(illegal)
            log.error("%d decoded SIDs map to no item in catalog v%d", illegal, answer.version)
        if answer.version != view.version:  # the decoder lags the live catalog: never
            live = view.holds(answer.item_ids[rows])  # return what it has since removed
            rows, logp = rows[live], logp[live]
        return Found(answer, rows, logp, answer.tokens[rows])

    def _answer(self, prep: Prepared, found: Found, user, pscore, count: int):
        """The best ``count`` candidates by the P-Score (blended) where given, else by the
        generator's ranking stage; topped up from popularity if too few are left."""
        m, view, answer = self.ctx.metrics, prep.view, found.answer
        tokens = found.tokens[None]
        if pscore is not None:
            blend = self.ctx.reward.blend
            order, scores = rank_by_reward(pscore[None], found.logp[None], tokens, blend)
            ranking = "reward"
        else:
            if user.shape != answer.table.shape[1:]:
                raise ValueError(f"user vector {user.shape}, item table {answer.table.shape}")
            order, scores = rank_candidates(user[None], answer.table, tokens, found.logp[None])
            ranking = "generation"
        rows, scores = found.rows[order[0]][:count], scores[0][:count]
        ids, sids = answer.item_ids[rows], answer.sids[rows]
        if len(rows) < count:  # the decoder ran out of allowed SIDs: top up from popularity
            m.topped_up.inc()
            fill = view.popular(prep.seen, np.concatenate([prep.excluded, ids]), count - len(rows))
            ids = np.concatenate([ids, view.item_ids[fill]])
            sids = np.concatenate([sids, view.sids[fill]])
            scores = np.concatenate([scores, below(scores, len(fill))])
        return ids, scores, sids, ranking

    async def _fallback(self, prep: Prepared, reason: str, count: int, request_id: str):
        self.ctx.metrics.fallback.labels(reason).inc()
        self.ctx.metrics.window.add(0.0)
        view = prep.view
        rows = await asyncio.to_thread(view.popular, prep.seen, prep.excluded, count)
        scores = np.log1p(np.arange(len(rows), 0, -1, dtype=np.float32))  # rank-based
        return self._response(
            view.item_ids[rows],
            scores,
            view.sids[rows],
            view.version,
            reason,
            request_id,
            "popularity",
        )

    def _response(
        self, ids, scores, sids, version: int, degraded: str, request_id: str, ranking: str
    ):
        items = [
            pb.RecommendedItem(item_id=str(item), score=float(score), semantic_id=sid.tolist())
            for item, score, sid in zip(ids, scores, sids, strict=True)
        ]
        return pb.RecommendResponse(
            items=items,
            model_version=f"{self.ctx.model_name}:catalog-v{version}",
            degraded=degraded,
            request_id=request_id,
            ranking=ranking,
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
        retry = "events not stored, retry with the same request_id"
        if not self.store_ready:
            ctx.metrics.store_errors.labels("LogEvents").inc()
            raise Unavailable(f"{retry}: the feature store is unavailable")
        try:
            accepted = await asyncio.to_thread(
                ctx.store.append, request.user_id, rows, request.request_id
            )
        except StoreUnavailable as e:
            self._store_failed("LogEvents", e)
            raise Unavailable(f"{retry}: {e}") from e
        ctx.builder.refresher.request(request.user_id)  # recompresses if enough arrived
        return pb.LogEventsResponse(accepted=accepted)

    def _store_failed(self, method: str, error: StoreUnavailable) -> None:
        self.ctx.metrics.store_errors.labels(method).inc()
        self.store_ready = False
        self._store_down_log.warning("feature store unavailable: %s", error)


def add_to_server(service: RecommenderService, server: grpc.aio.Server) -> None:
    """The generated ``add_RecommenderServicer_to_server``, with deserializers that hand
    unparseable bytes to the servicer as :class:`Malformed` instead of failing the call."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=_parser(request),
            response_serializer=response.SerializeToString,
        )
        for name, request, response in (
            ("Recommend", pb.RecommendRequest, pb.RecommendResponse),
            ("LogEvents", pb.LogEventsRequest, pb.LogEventsResponse),
        )
    }
    name = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
