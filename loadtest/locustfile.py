"""Locust load for the OneRec front end: gRPC users with a realistic traffic mix.

The gRPC pattern is Locust's documented one: gevent-patched grpc, and a client
interceptor that fires Locust's ``request`` event for every call. Traffic:

* 90% ``Recommend``, 10% ``LogEvents`` (one fresh event, like an app reporting a view);
* user ids drawn from a Zipf law over the build's users (heavy users are hot), with
  ``ONEREC_LOAD_UNKNOWN`` (default 5%) of calls for users nobody has seen (cold start);
* ``ONEREC_LOAD_COUNT`` (10) items at ``ONEREC_LOAD_BEAM`` (0 = server default) beams.

Any non-OK status is a failure; a degraded answer is not (it is a valid answer), but it
is reported under its own name so that fallbacks are visible in the stats.

    locust -f loadtest/locustfile.py --host localhost:50051
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402 - after gevent's patching, as Locust's gRPC example does
import pandas as pd  # noqa: E402
from locust import User, between, task  # noqa: E402
from locust.exception import LocustError  # noqa: E402

from onerec.v1 import recommender_pb2 as pb  # noqa: E402
from onerec.v1 import recommender_pb2_grpc as pb_grpc  # noqa: E402

ARTIFACTS = Path(os.environ.get("ONEREC_ARTIFACTS", "artifacts/synthetic"))
COUNT = int(os.environ.get("ONEREC_LOAD_COUNT", "10"))
BEAM = int(os.environ.get("ONEREC_LOAD_BEAM", "0"))
UNKNOWN = float(os.environ.get("ONEREC_LOAD_UNKNOWN", "0.05"))
ZIPF_A = float(os.environ.get("ONEREC_LOAD_ZIPF", "1.2"))
TOKEN = os.environ.get("ONEREC_LOAD_TOKEN", "")


USERS = pd.read_parquet(ARTIFACTS / "data" / "users.parquet")["user_id"].astype(str).to_numpy()
ITEMS = pd.read_parquet(ARTIFACTS / "data" / "items.parquet")["item_id"].astype(str).to_numpy()


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to Locust, with its status and response size."""

    def __init__(self, environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        response, exception, length = None, None, 0
        name = client_call_details.method.rsplit("/", 1)[-1]
        try:
            response = continuation(client_call_details, request)
            result = response.result()
            length = result.ByteSize()
            if getattr(result, "degraded", ""):
                name = f"{name} ({result.degraded})"
        except grpc.RpcError as e:
            exception = e
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=response,
            context=None,
            exception=exception,
        )
        return response


class RecommenderUser(User):
    """An app backend calling the front end."""

    wait_time = between(0.0, 0.05)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("set --host to the front end's host:port")
        channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.RecommenderStub(
            grpc.intercept_channel(channel, LocustInterceptor(environment))
        )
        self.metadata = [("authorization", f"Bearer {TOKEN}")] if TOKEN else []
        self.rng = np.random.default_rng()

    def _user(self) -> str:
        if self.rng.random() < UNKNOWN:
            return f"unknown-{self.rng.integers(1 << 30)}"
        rank = int(self.rng.zipf(ZIPF_A))
        while rank > len(USERS):  # redraw the tail rather than pile it on the last user
            rank = int(self.rng.zipf(ZIPF_A))
        return str(USERS[rank - 1])

    @task(9)
    def recommend(self) -> None:
        request = pb.RecommendRequest(user_id=self._user(), count=COUNT, beam_width=BEAM)
        with contextlib.suppress(grpc.RpcError):  # the interceptor has reported it
            self.stub.Recommend(request, metadata=self.metadata, timeout=10)

    @task(1)
    def log_events(self) -> None:
        event = pb.Event(
            item_id=str(ITEMS[self.rng.integers(len(ITEMS))]),
            timestamp_ms=int(time.time() * 1000),
            watch_ms=int(self.rng.integers(0, 60_000)),
            click=True,
            like=bool(self.rng.random() < 0.1),
        )
        request = pb.LogEventsRequest(user_id=self._user(), events=[event])
        with contextlib.suppress(grpc.RpcError):
            self.stub.LogEvents(request, metadata=self.metadata, timeout=10)
