"""The gRPC front end as app backends use it: `onerec serve` in a subprocess, real sockets,
the real tritonserver (conftest ``served``) and the SQLite feature store on disk."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import psutil
import pytest
import torch
import tritonclient.http as httpclient
from conftest import SERVING, Server, free_ports
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onerec.cli import main
from onerec.cli.build import load_features
from onerec.event_arrays import EventArrays
from onerec.experiment import load_item_tables, load_model
from onerec.runtime import catalog
from onerec.runtime.layout import ENCODER, REWARD, REWARD_ONNX, catalog_dir
from onerec.runtime.onnx_runners import OnnxReward
from onerec.runtime.pathways import build_pathways
from onerec.v1 import recommender_pb2 as pb
from onerec.v1 import recommender_pb2_grpc as pb_grpc
from server.feature_store import SQLiteFeatureStore
from server.redis_store import RedisFeatureStore
from server.triton_client import probe
from server.triton_launcher import TritonPorts, TritonProcess

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RECOVERY_S = 60  # kill -9 of Triton to model answers again: backoff, start-up, probe


@pytest.fixture(scope="module")
def front(served, tmp_path_factory):
    server = Server(served, tmp_path_factory.mktemp("front"), served[0].grpc_url)
    channel = grpc.insecure_channel(server.address)
    server.wait_health(SERVING, channel)
    yield server, pb_grpc.RecommenderStub(channel)
    channel.close()
    server.stop()


def _gauge(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(f"{name} ")).split()[1])


def _user(served, i: int) -> str:
    return str(served[1].users["user_id"].iloc[i])


def _seen(served, user: str) -> set[str]:
    ev = served[1].events
    return set(ev.loc[ev["user_id"].astype(str) == user, "item_id"].astype(str))


def test_recommend_returns_real_unseen_items_with_their_sids(served, front) -> None:
    _, stub = front
    live = catalog.load(catalog_dir(served[3]))
    sid_of = dict(zip(live.items.item_ids, map(tuple, live.items.codes), strict=True))
    for i in range(0, 40, 7):
        user = _user(served, i)
        r = stub.Recommend(pb.RecommendRequest(user_id=user, count=10, request_id=f"r{i}"))
        assert r.degraded == "" and r.request_id == f"r{i}"
        assert r.model_version.startswith("onerec-") and "catalog-v" in r.model_version
        ids = [item.item_id for item in r.items]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert not set(ids) & _seen(served, user)
        for item in r.items:
            assert tuple(item.semantic_id) == sid_of[item.item_id]
        scores = [item.score for item in r.items]
        assert scores == sorted(scores, reverse=True)


def test_item_scores_add_the_user_vectors_score_to_the_sids_log_probability(served, front) -> None:
    """The ranking stage, checked from outside: take away each item's dot product with the
    user vector that the same weights give the user's last events in torch, and what is
    left is its SID's log-probability (at most 0, the same for items of one SID); the
    answer is in score order. (tests/test_ranking.py checks the exact order; with these
    random weights the user's share of a score is small.)"""
    _, ds, cfg, repo, art = served
    _, stub = front
    model = load_model(art, load_item_tables(art)[1])
    table = np.load(repo / ENCODER / "1" / "item_table.npy")
    index = {item: i for i, item in enumerate(ds.items["item_id"].astype(str))}
    events = EventArrays.from_dataset(ds)
    for i in (11, 25):
        h = events.user(i)
        newest = torch.from_numpy(h.items[::-1][: cfg.short_len].copy() + 1)[None]
        with torch.no_grad():
            user = model.user(newest)[0].numpy()
        request = pb.RecommendRequest(
            user_id=_user(served, i), count=10, ranking=pb.RANKING_GENERATION
        )
        r = stub.Recommend(request)
        assert r.degraded == "" and len(r.items) == 10 and r.ranking == "generation"
        scores = np.array([item.score for item in r.items])
        assert (np.diff(scores) <= 0).all()
        logp = scores - table[[index[item.item_id] + 1 for item in r.items]] @ user
        assert (logp <= 1e-5).all()
        by_sid: dict[tuple, float] = {}
        for item, value in zip(r.items, logp, strict=True):
            assert abs(by_sid.setdefault(tuple(item.semantic_id), value) - value) < 1e-4


def test_by_default_the_reward_model_orders_the_answer_by_each_items_pscore(served, front) -> None:
    """Reward selection, checked from outside: with the build's blend of 0, each item's
    score is the P-Score that reward.onnx gives it for the user's own pathways, and the
    answer is in that order; asked for, the generator's order answers instead."""
    _, ds, cfg, repo, art = served
    server, stub = front
    reward = OnnxReward(repo / REWARD / "1" / REWARD_ONNX, threads=1)
    index = {item: i for i, item in enumerate(ds.items["item_id"].astype(str))}
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    vectors = load_item_tables(art)[1].vectors
    reordered = 0
    for i in (4, 17, 30):
        user = _user(served, i)
        r = stub.Recommend(pb.RecommendRequest(user_id=user, count=20))
        assert r.degraded == "" and len(r.items) == 20 and r.ranking == "reward"
        scores = np.array([item.score for item in r.items])
        assert (np.diff(scores) <= 0).all()
        p = build_pathways(events.user(i), int(time.time() * 1000), static[i], vectors, cfg)
        tokens = np.array([[index[item.item_id] + 1 for item in r.items]])
        _, pscore = reward.score(
            p["static"][None], p["short_items"][None], p["pos_items"][None], tokens
        )
        np.testing.assert_allclose(scores, pscore[0], atol=1e-5)
        generation = pb.RecommendRequest(user_id=user, count=20, ranking=pb.RANKING_GENERATION)
        g = stub.Recommend(generation)
        assert g.ranking == "generation"
        reordered += [x.item_id for x in g.items] != [x.item_id for x in r.items]
    assert reordered  # the two stages disagree somewhere, or this test could not tell them apart
    text = server.metrics()
    assert _gauge(text, 'onerec_stage_latency_seconds_count{stage="reward"}') >= 3
    assert _gauge(text, "onerec_reward_skipped_total") == 0


def test_a_reward_model_that_is_away_leaves_the_generators_order(served, front) -> None:
    """The reward model unloaded from Triton: answers keep coming, in the generator's
    order, and are counted; once it is back, it orders them again."""
    triton, *_ = served
    server, stub = front
    request = pb.RecommendRequest(user_id=_user(served, 8), count=10)
    with httpclient.InferenceServerClient(triton.http_url) as client:
        client.unload_model(REWARD)
        try:
            while client.is_model_ready(REWARD):
                time.sleep(0.1)
            r = stub.Recommend(request)
            assert r.degraded == "" and len(r.items) == 10 and r.ranking == "generation"
            assert _gauge(server.metrics(), "onerec_reward_skipped_total") >= 1
        finally:
            client.load_model(REWARD)
    assert stub.Recommend(request).ranking == "reward"


def test_exclusions_and_inline_events_are_never_returned(served, front) -> None:
    _, stub = front
    user = _user(served, 3)
    first = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=user)).items]
    now = int(time.time() * 1000)
    request = pb.RecommendRequest(
        user_id=user,
        exclude_item_ids=first[:3],
        events=[pb.Event(item_id=first[3], timestamp_ms=now - 1000, watch_ms=5000, like=True)],
    )
    again = [i.item_id for i in stub.Recommend(request).items]
    assert len(again) == 10 and not set(again) & set(first[:4])


def test_unknown_user_gets_a_cold_start_answer(front) -> None:
    server, stub = front
    r = stub.Recommend(pb.RecommendRequest(user_id="never-seen-user", count=5))
    assert r.degraded == "cold_start" and len(r.items) == 5
    assert 'onerec_fallback_total{reason="cold_start"}' in server.metrics()


def test_logged_events_are_durable_and_seen_by_the_next_recommend(served, front) -> None:
    server, stub = front
    user = _user(served, 5)
    top = stub.Recommend(pb.RecommendRequest(user_id=user, count=3)).items[0].item_id
    now = int(time.time() * 1000)
    event = pb.Event(item_id=top, timestamp_ms=now, watch_ms=9000, click=True)
    assert stub.LogEvents(pb.LogEventsRequest(user_id=user, events=[event])).accepted == 1
    # Committed before the acknowledgement: another connection to the file sees it.
    recent = SQLiteFeatureStore(server.store).recent(user, 1)
    assert recent.timestamp.tolist() == [now]
    after = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=user)).items]
    assert top not in after


BAD_RECOMMEND = [
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u" * 200}, "user_id"),
    ({"user_id": "a\x00b"}, "user_id"),
    ({"count": -1}, "count"),
    ({"count": 1000}, "count"),
    ({"beam_width": 1000}, "beam_width"),
    ({"count": 50, "beam_width": 20}, "beam_width"),
    ({"exclude_item_ids": ["ok", ""]}, "exclude_item_ids[1]"),
    ({"request_id": "r" * 500}, "request_id"),
    ({"request_id": "r\n1"}, "request_id"),
    ({"events": [pb.Event(item_id="x", timestamp_ms=4_000_000_000_000)]}, "events[0].timestamp_ms"),
    ({"events": [pb.Event(item_id="x", timestamp_ms=5)]}, "events[0].timestamp_ms"),
    ({"events": [pb.Event(item_id="", timestamp_ms=1_700_000_000_000)]}, "events[0].item_id"),
    (
        {"events": [pb.Event(item_id="x", timestamp_ms=1_700_000_000_000, watch_ms=-5)]},
        "events[0].watch_ms",
    ),
    ({"events": [pb.Event(item_id="x", timestamp_ms=1_700_000_000_000)] * 300}, "events"),
    ({"ranking": 7}, "ranking"),
]


@pytest.mark.parametrize(("fields", "name"), BAD_RECOMMEND)
def test_bad_recommend_fields_are_invalid_argument_naming_the_field(front, fields, name) -> None:
    _, stub = front
    request = pb.RecommendRequest(**({"user_id": "u1"} | fields))
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(name)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"user_id": "u1"}, "events"),
        (
            {"user_id": "", "events": [pb.Event(item_id="x", timestamp_ms=1_700_000_000_000)]},
            "user_id",
        ),
    ],
)
def test_bad_log_events_are_invalid_argument(front, fields, name) -> None:
    _, stub = front
    with pytest.raises(grpc.RpcError) as err:
        stub.LogEvents(pb.LogEventsRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(name)


KNOWN_FIELDS = (
    "user_id",
    "count",
    "beam_width",
    "events",
    "exclude_item_ids",
    "request_id",
    "ranking",
)
texts = st.text(max_size=300)
events = st.builds(
    pb.Event,
    item_id=texts,
    timestamp_ms=st.integers(-(2**63), 2**63 - 1),
    watch_ms=st.integers(-(2**63), 2**63 - 1),
    like=st.booleans(),
    hate=st.booleans(),
)
requests = st.builds(
    pb.RecommendRequest,
    user_id=texts,
    count=st.integers(-(2**31), 2**31 - 1),
    beam_width=st.integers(-(2**31), 2**31 - 1),
    events=st.lists(events, max_size=300),
    exclude_item_ids=st.lists(texts, max_size=5),
    request_id=texts,
    ranking=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2]),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests)
def test_generated_requests_get_an_answer_or_a_named_invalid_argument(front, request) -> None:
    """Whatever the fields hold: a valid answer, or INVALID_ARGUMENT naming a field;
    never another error, and the server keeps serving."""
    _, stub = front
    try:
        reply = stub.Recommend(request, timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().split(":")[0].split("[")[0] in KNOWN_FIELDS, e.details()
    else:
        assert len(reply.items) == (request.count or 10)
    assert stub.Recommend(pb.RecommendRequest(user_id="never-seen-user")).items


plausible_events = st.builds(
    pb.Event,
    item_id=texts,
    timestamp_ms=st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.integers(1_600_000_000_000, 1_800_000_000_000)
    ),
    watch_ms=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 10**6)),
    like=st.booleans(),
    forward=st.booleans(),
)
log_requests = st.builds(
    pb.LogEventsRequest,
    user_id=texts,
    events=st.lists(plausible_events, max_size=20),
    # Empty or invalid only: a valid id repeated by Hypothesis would be a deduplicated retry.
    request_id=st.one_of(st.just(""), st.just("r\n1"), st.text(min_size=129, max_size=140)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=log_requests)
def test_generated_log_events_are_stored_or_a_named_invalid_argument(front, request) -> None:
    """LogEvents commits all of a call's events or none: a bad one names its field."""
    server, stub = front
    store = SQLiteFeatureStore(server.store)
    before = store.version(request.user_id) if request.user_id else 0
    try:
        reply = stub.LogEvents(request, timeout=30)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details().split(":")[0].split("[")[0] in KNOWN_FIELDS, e.details()
        assert not request.user_id or store.version(request.user_id) == before  # none stored
    else:
        assert reply.accepted == len(request.events)
        assert store.version(request.user_id) == before + len(request.events)  # all stored
    finally:
        store.close()
    assert stub.Recommend(pb.RecommendRequest(user_id="never-seen-user")).items


def test_cli_client_prints_a_table(served, front, capsys) -> None:
    server, _ = front
    user = _user(served, 4)
    argv = ["recommend", "--user", user, "--count", "4", "--address", server.address]
    assert main([*argv, "--artifacts", str(served[4])]) == 0
    out = capsys.readouterr().out
    assert user in out and "catalog-v" in out and "cat" in out  # synthetic topics: catN/subM
    assert main(["recommend", "--user", "", "--address", server.address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().out


def test_oversized_messages_are_refused(front) -> None:
    _, stub = front
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(user_id="u1", request_id="x" * (5 * 1024 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_health_and_reflection(served, front) -> None:
    server, stub = front
    stub.Recommend(pb.RecommendRequest(user_id="never-seen-user"))
    before = server.metrics()
    stub.Recommend(pb.RecommendRequest(user_id=_user(served, 9)))
    text = server.metrics()
    ok = 'onerec_requests_total{code="OK",method="Recommend"}'
    for name in (
        ok,
        "onerec_model_flops_total",
        'onerec_stage_latency_seconds_count{stage="triton"}',
    ):
        assert _gauge(text, name) > _gauge(before, name), name
    for name in (
        'onerec_requests_total{code="OK",method="Recommend"}',
        'onerec_request_latency_seconds_bucket{le="0.1",method="Recommend"}',
        'onerec_stage_latency_seconds_count{stage="triton"}',
        "onerec_model_flops_total",
        "onerec_mfu",
        "onerec_shed_total 0.0",
        "onerec_illegal_items_total 0.0",
    ):
        assert name in text, name
    assert _gauge(text, "onerec_qps") > 0 and _gauge(text, "onerec_mfu") > 0
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "onerec.v1.Recommender" in services and "grpc.health.v1.Health" in services


def test_triton_outage_falls_back_and_recovers(served, tmp_path) -> None:
    """A Triton of its own: frozen (SIGSTOP), the front end still answers within the
    caller's deadline, from popularity; stopped, it reports NOT_SERVING; restarted on the
    same ports, the model answers again."""
    _, _, cfg, repo, _ = served
    ports = TritonPorts(*free_ports(3))
    triton = TritonProcess(repo, ports, probe=lambda url: probe(url, cfg)).start()
    server = Server(served, tmp_path, triton.grpc_url)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.RecommenderStub(channel)
    user = _user(served, 2)
    try:
        server.wait_health(SERVING, channel)
        assert stub.Recommend(pb.RecommendRequest(user_id=user)).degraded == ""
        os.kill(triton.proc.pid, signal.SIGSTOP)  # slow past any deadline
        try:
            started = time.monotonic()
            r = stub.Recommend(pb.RecommendRequest(user_id=user), timeout=1.0)
            assert r.degraded == "model_unavailable" and len(r.items) == 10
            assert time.monotonic() - started < 1.0
        finally:
            os.kill(triton.proc.pid, signal.SIGCONT)
        triton.stop()
        r = stub.Recommend(pb.RecommendRequest(user_id=user), timeout=5)
        assert r.degraded == "model_unavailable" and len(r.items) == 10
        assert not {i.item_id for i in r.items} & _seen(served, user)
        server.wait_health(NOT_SERVING, channel)
        alive = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert alive.status == SERVING  # liveness: the process is fine, only the model is away
        triton = TritonProcess(repo, ports, probe=lambda url: probe(url, cfg)).start()
        server.wait_health(SERVING, channel)
        assert stub.Recommend(pb.RecommendRequest(user_id=user)).degraded == ""
        text = server.metrics()
        assert _gauge(text, 'onerec_fallback_total{reason="model_unavailable"}') >= 1
    finally:
        channel.close()
        server.stop()
        triton.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for localhost, made in-process (no openssl binary needed),
    and the bearer token file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "token").write_text("s3cret\n")
    return d


def test_tls_token_admission_and_graceful_shutdown(served, tls, tmp_path) -> None:
    server = Server(
        served,
        tmp_path,
        served[0].grpc_url,
        "--tls-cert",
        str(tls / "cert.pem"),
        "--tls-key",
        str(tls / "key.pem"),
        "--auth-token-file",
        str(tls / "token"),
        "--max-inflight",
        "2",
        "--drain-s",
        "2",
    )
    creds = grpc.ssl_channel_credentials((tls / "cert.pem").read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    channel = grpc.secure_channel(server.address, creds, options)
    try:
        server.wait_health(SERVING, channel)  # health needs no token
        stub = pb_grpc.RecommenderStub(channel)
        request = pb.RecommendRequest(user_id=_user(served, 1), beam_width=512)
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(request, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = [("authorization", "Bearer s3cret")]
        assert len(stub.Recommend(request, metadata=auth).items) == 10
        with grpc.insecure_channel(server.address) as plain:  # no TLS: no answer at all
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RecommenderStub(plain).Recommend(request, metadata=auth, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        # Admission control: 2 in flight at most; the rest are shed at once.
        codes: list = []

        def call() -> None:
            try:
                stub.Recommend(request, metadata=auth, timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())

        threads = [threading.Thread(target=call) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
        assert codes.count(grpc.StatusCode.OK) > 0
        shed = _gauge(server.metrics(), "onerec_shed_total")
        assert shed == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)

        # SIGTERM while a call is in flight: health goes NOT_SERVING at once, calls are
        # still answered while load balancers drain, the in-flight call completes, and
        # the process exits 0.
        result: list = []
        for _ in range(50):
            call = threading.Thread(
                target=lambda: result.append(stub.Recommend(request, metadata=auth, timeout=30))
            )
            call.start()
            while call.is_alive() and _gauge(server.metrics(), "onerec_inflight") < 1:
                pass
            if call.is_alive():  # caught it inside the server
                server.proc.send_signal(signal.SIGTERM)
                call.join()
                health_stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(50):
                    status = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == NOT_SERVING:
                        break
                    time.sleep(0.02)
                assert status == NOT_SERVING
                assert len(stub.Recommend(request, metadata=auth, timeout=5).items) == 10
                break
            call.join()
        else:
            pytest.fail("never caught a call in flight")
        assert server.proc.wait(60) == 0
        assert len(result[-1].items) == 10
    finally:
        channel.close()
        server.stop()


def test_acknowledged_events_survive_kill_9(served, tmp_path) -> None:
    server = Server(served, tmp_path, served[0].grpc_url)
    channel = grpc.insecure_channel(server.address)
    try:
        server.wait_health(SERVING, channel)
        stub = pb_grpc.RecommenderStub(channel)
        now = int(time.time() * 1000)
        acked = 0
        for i in range(20):
            e = pb.Event(item_id=f"item-{i}", timestamp_ms=now + i, watch_ms=100)
            acked += stub.LogEvents(pb.LogEventsRequest(user_id="crash-user", events=[e])).accepted
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
    finally:
        channel.close()
        server.log.close()
    store = SQLiteFeatureStore(server.store)
    assert acked == 20 and store.version("crash-user") == 20
    np.testing.assert_array_equal(store.history("crash-user").timestamp, now + np.arange(20))
    # Restarted on the same file, the server knows the user by those events alone.
    again = Server(served, tmp_path, served[0].grpc_url, store=server.store)
    channel = grpc.insecure_channel(again.address)
    try:
        again.wait_health(SERVING, channel)
        r = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id="crash-user"))
        assert r.degraded == "" and len(r.items) == 10
    finally:
        channel.close()
        again.stop()


def test_onerec_serve_alone_restarts_a_killed_triton_and_stops_both(served, tmp_path) -> None:
    """`make run`'s serving step: no --triton-url, so it launches its own Triton and
    supervises it. ``kill -9`` of that Triton under load: every call is still answered,
    from the fallback during the outage, and by the model again within RECOVERY_S."""
    _, _, _, repo, art = served
    http, grpc_port, metrics, port, front_metrics = free_ports(5)
    env = dict(os.environ, TRITON_HTTP_PORT=str(http), TRITON_GRPC_PORT=str(grpc_port))
    env |= {"TRITON_METRICS_PORT": str(metrics), "ONEREC_PORT": str(port)}
    env |= {"ONEREC_METRICS_PORT": str(front_metrics), "ONEREC_PEAK_FLOPS": "1e11"}
    env |= {"ONEREC_PROBE_INTERVAL_S": "0.5"}
    env.pop("ONEREC_TRITON_URL", None)
    shutil.copy(art / "features.sqlite", tmp_path / "f.sqlite")
    argv = [sys.executable, "-m", "onerec", "serve", "--artifacts", str(art)]
    argv += ["--repository", str(repo), "--feature-store", str(tmp_path / "f.sqlite")]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    answers: list[tuple[float, str]] = []  # (time, degraded) of every answer
    failures: list = []
    stop = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            request = health_pb2.HealthCheckRequest(service="onerec.v1.Recommender")
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "never SERVING"
                try:
                    if stub.Check(request, timeout=2).status == SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
            recommender = pb_grpc.RecommenderStub(channel)
            r = recommender.Recommend(pb.RecommendRequest(user_id=_user(served, 0)), timeout=10)
            assert r.degraded == "" and len(r.items) == 10

            def load() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        r = recommender.Recommend(
                            pb.RecommendRequest(user_id=_user(served, i % 40)), timeout=5
                        )
                        answers.append((time.monotonic(), r.degraded))
                    except grpc.RpcError as e:
                        failures.append(e.code())

            client = threading.Thread(target=load)
            client.start()
            time.sleep(1.0)
            children = psutil.Process(proc.pid).children()
            (triton,) = [c for c in children if c.name() == "tritonserver"]
            killed = time.monotonic()
            triton.kill()  # SIGKILL
            while time.monotonic() < killed + RECOVERY_S:
                late = [d for t, d in answers if t > killed]
                if "model_unavailable" in late and late[-1] == "":
                    break
                time.sleep(0.2)
            stop.set()
            client.join()
        after = [(t, d) for t, d in answers if t > killed]
        outage = next(t for t, d in after if d == "model_unavailable")  # the fallback answered
        recovered = next(t for t, d in after if t > outage and d == "")
        assert not failures, failures
        assert recovered - killed < RECOVERY_S
        text = (tmp_path / "serve.log").read_text()
        assert "restarting" in text
        assert text.count("triton unavailable") < 10  # a line now and then, not one a call
        with pytest.raises(ProcessLookupError):  # its python backend stubs were reaped too
            os.killpg(triton.pid, 0)
        # The front end's own probe can see the new Triton ready a moment before the
        # supervisor's start() returns and counts the restart, so the counter may lag.
        url = f"http://127.0.0.1:{front_metrics}/metrics"
        deadline = time.monotonic() + 30
        while True:
            metrics_text = urllib.request.urlopen(url, timeout=5).read().decode()
            restarts = _gauge(metrics_text, "onerec_triton_restarts_total")
            if restarts >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert restarts == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert "front end stopped" in (tmp_path / "serve.log").read_text()
        with socket.socket() as sock:  # and its Triton is gone too
            assert sock.connect_ex(("127.0.0.1", http)) != 0
    finally:
        stop.set()
        proc.kill()
        log.close()


@pytest.mark.parametrize("method", ["Recommend", "LogEvents"])
def test_undecodable_bytes_are_invalid_argument(front, method) -> None:
    """Bytes that are not the request message get INVALID_ARGUMENT (grpc's own answer
    would be UNKNOWN), and the server goes on serving."""
    server, stub = front
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(f"/onerec.v1.Recommender/{method}")  # bytes in, bytes out
        for payload in [b"\xff\xff\xff", b"\n\x05ab", *(rng.bytes(n) for n in (7, 64, 512))]:
            with pytest.raises(grpc.RpcError) as err:
                raw(payload, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert stub.Recommend(pb.RecommendRequest(user_id="never-seen-user")).items
    metrics = server.metrics()
    invalid = f'onerec_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'
    assert _gauge(metrics, invalid) >= 5


def test_two_front_ends_share_one_redis(served, redis_server, tmp_path) -> None:
    """A fleet: two front ends on one Redis and one Triton. An event logged through A is
    excluded from B's next answer. With Redis down, Recommend answers from the fallback
    (``feature_store_unavailable``), LogEvents is UNAVAILABLE and stores nothing, health
    says so; with Redis back, both serve from it again."""
    *_, repo, art = served
    url = redis_server.flush(4)
    load_features(art, repo, url, force=True)
    a = Server(served, tmp_path, served[0].grpc_url, store=url)
    b = Server(served, tmp_path, served[0].grpc_url, store=url)
    channels = [grpc.insecure_channel(s.address) for s in (a, b)]
    try:
        for server, channel in zip((a, b), channels, strict=True):
            server.wait_health(SERVING, channel)
        stub_a, stub_b = (pb_grpc.RecommenderStub(c) for c in channels)
        user = _user(served, 6)
        top = stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5)).items[0].item_id
        now = int(time.time() * 1000)
        event = pb.Event(item_id=top, timestamp_ms=now, watch_ms=9000, like=True)
        logged = pb.LogEventsRequest(user_id=user, events=[event], request_id="fleet-1")
        assert stub_a.LogEvents(logged).accepted == 1
        again = stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5))
        assert again.degraded == "" and top not in {i.item_id for i in again.items}
        store = RedisFeatureStore(url)
        version = store.version(user)

        redis_server.kill(signal.SIGSTOP)  # hangs: no answer, no refusal
        try:
            for _ in range(3):  # the first waits out the store's timeout, the rest do not
                started = time.monotonic()
                r = stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5), timeout=2)
                assert r.degraded == "feature_store_unavailable" and len(r.items) == 5
                assert time.monotonic() - started < 1.5
            with pytest.raises(grpc.RpcError) as err:
                stub_b.LogEvents(pb.LogEventsRequest(user_id=user, events=[event]), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5)).degraded:
            assert time.monotonic() < deadline, "never used the store again"
            time.sleep(0.2)

        redis_server.kill()
        try:
            r = stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5), timeout=5)
            assert r.degraded == "feature_store_unavailable" and len(r.items) == 5
            with pytest.raises(grpc.RpcError) as err:
                stub_a.LogEvents(pb.LogEventsRequest(user_id=user, events=[event]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(channels[0])
            store_health = health_pb2.HealthCheckRequest(service="onerec.FeatureStore")
            deadline = time.monotonic() + 30
            while health.Check(store_health, timeout=5).status != NOT_SERVING:
                assert time.monotonic() < deadline, "the store's health never said so"
                time.sleep(0.2)
            text = a.metrics()
            assert _gauge(text, 'onerec_feature_store_errors_total{method="LogEvents"}') == 1
            assert _gauge(text, 'onerec_dependency_up{dependency="feature_store"}') == 0
            fallback = 'onerec_fallback_total{reason="feature_store_unavailable"}'
            assert _gauge(b.metrics(), fallback) >= 1
        finally:
            redis_server.start()
        for channel in channels:  # calls use the store again from the next good ping on
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while health.Check(store_health, timeout=5).status != SERVING:
                assert time.monotonic() < deadline, "the store's health never came back"
                time.sleep(0.2)
        assert store.version(user) == version  # the refused call stored nothing
        assert stub_a.LogEvents(logged).accepted == 1  # a retry of the first: applied once
        assert store.version(user) == version
        r = stub_b.Recommend(pb.RecommendRequest(user_id=user, count=5), timeout=5)
        assert r.degraded == "" and top not in {i.item_id for i in r.items}
        store.close()
    finally:
        for channel in channels:
            channel.close()
        a.stop()
        b.stop()


@pytest.mark.parametrize(
    ("ranking", "has_reward", "selection", "want"),
    [
        (pb.RANKING_DEFAULT, True, True, True),
        (pb.RANKING_DEFAULT, True, False, False),
        (pb.RANKING_DEFAULT, False, True, False),
        (pb.RANKING_GENERATION, True, True, False),
        (pb.RANKING_REWARD, True, False, True),
        (pb.RANKING_REWARD, False, True, "ranking"),
    ],
)
def test_who_orders_an_answer(ranking, has_reward, selection, want) -> None:
    """The request's choice, else the server's setting; asking for the reward model's
    order where there is none is a bad argument, named."""
    from types import SimpleNamespace

    from server.service import RecommenderService
    from server.validation import Invalid

    ctx = SimpleNamespace(reward=object() if has_reward else None, reward_selection=selection)
    service = RecommenderService(ctx)
    if isinstance(want, str):
        with pytest.raises(Invalid, match=f"^{want}:"):
            service._by_reward(ranking)
    else:
        assert service._by_reward(ranking) is want
