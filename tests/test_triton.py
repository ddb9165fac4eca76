"""The model repository served by the real ``tritonserver`` (nvidia-pytriton's, on CPU).

One Triton per session (the ``served`` fixture in conftest.py), started by the project's
launcher on free ports against a tiny randomly initialised model: random weights are the
adversarial case for the trie, and equality with the offline reference does not need a
trained model.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import free_ports
from tritonclient.utils import InferenceServerException

from onerec.event_arrays import EventArrays
from onerec.runtime import catalog
from onerec.runtime.beam_search import constrained_beam_search, exclude_leaves
from onerec.runtime.layout import catalog_dir
from onerec.runtime.onnx_runners import OnnxDecoder, OnnxEncoder
from onerec.runtime.pathways import build_pathways, collate
from server.triton_client import (
    ENSEMBLE,
    empty_pathways,
    ensemble_inputs,
    probe,
    repository_config,
    requested_outputs,
)


def _pathways(served, users: range) -> list[dict[str, np.ndarray]]:
    """The pathways the front end would build for ``users`` right after their last event."""
    _, ds, cfg, _, art = served
    events = EventArrays.from_dataset(ds)
    static = ds.users[ds.static_feature_columns()].to_numpy(np.int64)
    vectors = np.load(art / "tokenizer" / "item_embeddings.npy")
    out = []
    for u in users:
        h = events.user(u)
        out.append(build_pathways(h, int(h.timestamp[-1]) + 1000, static[u], vectors, cfg))
    return out


def _infer(url: str, pathways, beam: int, count: int, exclude=None):
    with grpcclient.InferenceServerClient(url) as client:
        r = client.infer(
            ENSEMBLE, ensemble_inputs(pathways, beam, count, exclude), outputs=requested_outputs()
        )
    return r.as_numpy("sids")[0], r.as_numpy("scores")[0], int(r.as_numpy("catalog_version")[0, 0])


def _reference(repo: Path, pathways, beam: int, trie, exclude=None):
    encoder = OnnxEncoder(repo / "onerec_encoder" / "1" / "encoder.onnx", threads=1)
    decoder = OnnxDecoder(repo / "onerec_decoder" / "1", threads=1)
    keep, kv, _ = encoder.encode(collate([pathways]))
    leaves = None if exclude is None else exclude_leaves(trie, [exclude])
    return constrained_beam_search(decoder.search(keep, kv), 1, beam, trie, exclude=leaves)


def _assert_same_beams(sids: np.ndarray, scores: np.ndarray, ref, n: int) -> None:
    """Triton's answer equals the reference search's first ``n`` beams, up to the order of
    near-ties: a batch pads its users to its longest, which moves scores by ~1e-6, and with
    random weights two SIDs can score that close. The last run of near-ties is left out,
    since the beam width may cut through it."""
    np.testing.assert_allclose(scores[:n], ref.scores[0, :n], rtol=1e-5, atol=1e-5)
    expected = ref.scores[0, :n]
    tie_run = np.r_[0, np.cumsum(np.abs(np.diff(expected)) > 1e-5)]
    for run in range(tie_run[-1]):
        at = tie_run == run
        assert sorted(map(tuple, sids[:n][at])) == sorted(map(tuple, ref.sids[0, :n][at]))


def test_top_k_equals_the_offline_reference(served) -> None:
    """Sent concurrently, so Triton batches users of different history lengths and beam
    widths together: each answer still equals that user's search alone."""
    triton, _, _, repo, _ = served
    trie = catalog.load(catalog_dir(repo)).trie
    cases = [(p, beam) for p in _pathways(served, range(0, 40, 5)) for beam in (1, 16, 64, 128)]
    answers: list = [None] * len(cases)

    def run(i: int) -> None:
        pathways, beam = cases[i]
        answers[i] = _infer(triton.grpc_url, pathways, beam, beam)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (pathways, beam), (sids, scores, _) in zip(cases, answers, strict=True):
        ref = _reference(repo, pathways, beam, trie)
        n = int(ref.valid[0].sum())
        _assert_same_beams(sids, scores, ref, n)
        assert (sids[n:] == -1).all()


def test_user_vector_equals_the_offline_encoder(served) -> None:
    """The ensemble passes the encoder's ranking-stage output through to the front end."""
    triton, _, cfg, repo, _ = served
    encoder = OnnxEncoder(repo / "onerec_encoder" / "1" / "encoder.onnx", threads=1)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        for pathways in _pathways(served, range(1, 40, 13)):
            r = client.infer(ENSEMBLE, ensemble_inputs(pathways, 4, 4), outputs=requested_outputs())
            _, _, user = encoder.encode(collate([pathways]))
            assert r.as_numpy("user").shape == (1, cfg.d_model)
            np.testing.assert_allclose(r.as_numpy("user"), user, rtol=1e-5, atol=1e-5)


def test_exclusions_are_honoured_like_the_reference(served) -> None:
    triton, _, _, repo, _ = served
    trie = catalog.load(catalog_dir(repo)).trie
    pathways = _pathways(served, range(3, 4))[0]
    top, _, _ = _infer(triton.grpc_url, pathways, 32, 32)
    exclude = top[:5]
    sids, scores, _ = _infer(triton.grpc_url, pathways, 32, 32, exclude)
    ref = _reference(repo, pathways, 32, trie, exclude)
    n = int(ref.valid[0].sum())
    _assert_same_beams(sids, scores, ref, n)
    assert (sids[n:] == -1).all()
    returned = {tuple(s) for s in sids if s[0] >= 0}
    assert not returned & {tuple(s) for s in exclude}


def test_no_illegal_sid_at_beam_512_with_random_weights(served) -> None:
    """Beam 512 over a catalog with more SIDs than that, so the search must prune at
    every level: 512 distinct legal SIDs, best first, for every request, while many
    requests are batched together."""
    triton, _, _, repo, _ = served
    legal = {tuple(s) for s in catalog.load(catalog_dir(repo)).trie.sids}
    assert len(legal) > 512
    requests = _pathways(served, range(40))
    answers: list = [None] * len(requests)

    def run(i: int) -> None:
        answers[i] = _infer(triton.grpc_url, requests[i], 512, 512)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sids, scores, _ in answers:
        returned = [tuple(s) for s in sids]
        assert set(returned) <= legal and len(set(returned)) == len(returned) == 512
        assert np.isfinite(scores).all() and (np.diff(scores) <= 0).all()


def _stats(url: str, model: str) -> tuple[int, int]:
    with grpcclient.InferenceServerClient(url) as client:
        s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def test_dynamic_batching_batches_concurrent_requests(served) -> None:
    triton, *_ = served
    before = {m: _stats(triton.grpc_url, m) for m in ("onerec_encoder", "onerec_decoder")}
    requests = _pathways(served, range(32)) * 2

    def run(chunk: list) -> None:
        for p in chunk:
            _infer(triton.grpc_url, p, 64, 10)

    threads = [threading.Thread(target=run, args=(requests[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for model, (inf0, exe0) in before.items():
        for _ in range(50):  # statistics are recorded just after the responses go out
            inferences, executions = (
                a - b for a, b in zip(_stats(triton.grpc_url, model), (inf0, exe0), strict=True)
            )
            if inferences >= len(requests):
                break
            time.sleep(0.1)
        assert inferences == len(requests)
        assert executions < inferences, f"{model}: {executions} executions for {inferences}"


def test_catalog_update_takes_effect_without_restart(served) -> None:
    triton, _, cfg, repo, _ = served
    live = catalog.load(catalog_dir(repo))
    items = live.items
    # Remove every item of three SIDs that only one item carries; add an item whose SID
    # no item had.
    unique = np.flatnonzero(
        np.unique(items.codes, axis=0, return_counts=True)[1][
            np.unique(items.codes, axis=0, return_inverse=True)[1].ravel()
        ]
        == 1
    )
    removed = items.item_ids[unique[:3]]
    removed_sids = {tuple(s) for s in items.codes[unique[:3]]}
    taken = {tuple(s) for s in items.codes}
    new_sid = next(s for s in np.ndindex(*(cfg.codebook_size,) * cfg.sid_levels) if s not in taken)
    updated = catalog.with_changes(
        items, add_ids=["brand-new"], add_codes=np.array([new_sid]), remove_ids=removed
    )
    version = catalog.publish(catalog_dir(repo), updated, cfg.codebook_size)
    assert version == live.version + 1
    try:
        for pathways in _pathways(served, range(0, 40, 4)):
            sids, _, used = _infer(triton.grpc_url, pathways, 512, 512)
            returned = {tuple(s) for s in sids if s[0] >= 0}
            assert used == version
            assert tuple(new_sid) in returned
            assert not returned & removed_sids
    finally:  # other tests share this repository: put the original items back live
        catalog.publish(catalog_dir(repo), items, cfg.codebook_size)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beam_width": np.array([[0]], np.int32)}, "beam_width"),
        ({"beam_width": np.array([[513]], np.int32)}, "beam_width"),
        ({"count": np.array([[65]], np.int32)}, "count"),  # beam 16: at most 4 x 16
        ({"short_items": np.array([[10**9]], np.int64)}, "short_items"),
        ({"static": np.zeros((1, 9), np.int64)}, "static"),
        ({"exclude_sids": np.zeros((1, 2, 5), np.int64)}, "exclude_sids"),
        ({"short_items": np.array([[1.5]], np.float32)}, "short_items"),
        ({"pos_flags": np.zeros((1, 3, 2), np.float32)}, "pos_flags"),
    ],
)
def test_bad_tensors_get_a_clear_error_and_the_server_keeps_serving(served, change, message):
    triton, _, cfg, *_ = served
    inputs = {i.name(): i for i in ensemble_inputs(empty_pathways(cfg), 16, 10)}
    for name, array in change.items():
        dtype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}.get(array.dtype, "FP32")
        inputs[name] = grpcclient.InferInput(name, list(array.shape), dtype)
        inputs[name].set_data_from_numpy(array)
    with (
        grpcclient.InferenceServerClient(triton.grpc_url) as client,
        pytest.raises(InferenceServerException, match=message) as err,
    ):
        client.infer(ENSEMBLE, list(inputs.values()), outputs=requested_outputs())
    assert "INVALID_ARG" in str(err.value.status())  # the caller's fault, not an outage
    probe(triton.grpc_url, cfg)  # the stubs survived


def test_a_malformed_cross_kv_sent_to_the_decoder_is_a_named_invalid_argument(served) -> None:
    """Straight to ``onerec_decoder``, K/V with the wrong head count: a named INVALID_ARG
    for that request, and a good request sent at the same moment is served (whether the
    two share a batch is Triton's choice; test_batching checks the shared-batch case)."""
    triton, _, cfg, *_ = served
    t = 5
    good = np.zeros((1, 2 * cfg.decoder_layers, cfg.n_heads, t, cfg.head_dim), np.float32)
    bad = good[:, :, :1]
    answers: dict = {}

    def call(name: str, kv: np.ndarray) -> None:
        arrays = {
            "keep": np.ones((1, t), bool),
            "cross_kv": kv,
            "beam_width": np.array([[8]], np.int32),
            "count": np.array([[8]], np.int32),
        }
        inputs = []
        for key, a in arrays.items():
            dtype = {"keep": "BOOL", "cross_kv": "FP32"}.get(key, "INT32")
            inputs.append(grpcclient.InferInput(key, list(a.shape), dtype))
            inputs[-1].set_data_from_numpy(a)
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            try:
                answers[name] = client.infer("onerec_decoder", inputs).as_numpy("sids")
            except InferenceServerException as e:
                answers[name] = e

    threads = [threading.Thread(target=call, args=a) for a in (("bad", bad), ("good", good))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert isinstance(answers["bad"], InferenceServerException)
    assert "INVALID_ARG" in str(answers["bad"].status()) and "cross_kv" in str(answers["bad"])
    assert answers["good"].shape == (1, 8, cfg.sid_levels) and (answers["good"] >= 0).all()


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name
)
def test_onerec_triton_waits_for_ready_and_stops_cleanly_on_signal(served, sig) -> None:
    """SIGINT and SIGTERM stop it in order; after a kill -9 of the launcher, the kernel's
    parent-death signal still stops its tritonserver, which frees the ports."""
    _, _, _, repo, _ = served
    http, grpc_port, metrics = free_ports(3)
    argv = [sys.executable, "-m", "onerec", "triton", "--repository", str(repo)]
    ports = ["--http-port", str(http), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(
        [*argv, *ports, "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # the launcher logs readiness only after the probe passed
            if "triton ready" in line:
                break
        else:
            pytest.fail(f"onerec triton exited with {proc.wait()} before it was ready")
        probe(f"127.0.0.1:{grpc_port}", repository_config(repo))
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            assert proc.wait(timeout=10) == -signal.SIGKILL
            deadline = time.monotonic() + 60
            while _listening(grpc_port):
                assert time.monotonic() < deadline, "tritonserver outlived its launcher"
                time.sleep(0.2)
            return
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "successfully unloaded 'onerec_decoder'" in rest
    finally:
        proc.kill()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
