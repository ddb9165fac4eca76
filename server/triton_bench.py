"""Printed latency/throughput of the ``onerec`` ensemble through a running Triton.

Closed loop: ``concurrency`` client threads each send one user's request, wait for the
answer, and send the next. Latency is per request as the client sees it; throughput is
requests over wall time. The average batch size each model saw comes from Triton's own
statistics (inference count over execution count) for the same interval.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.triton_client import ENSEMBLE, ensemble_inputs, requested_outputs

MODELS = ("onerec_encoder", "onerec_decoder")


@dataclass
class BenchRow:
    beam_width: int
    concurrency: int
    requests: int
    qps: float
    p50_ms: float
    p99_ms: float
    mean_batch: dict[str, float]
    errors: int  # failed requests: left out of the latencies and the QPS


def _counts(client: grpcclient.InferenceServerClient) -> dict[str, tuple[int, int]]:
    out = {}
    for model in MODELS:
        s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        out[model] = (int(s.get("inference_count", 0)), int(s.get("execution_count", 0)))
    return out


def run(
    url: str,
    pathways: list[dict[str, np.ndarray]],
    beam_width: int,
    concurrency: int,
    requests: int,
    count: int = 10,
) -> BenchRow:
    """Send ``requests`` requests (cycling through ``pathways``) with ``concurrency`` threads."""
    inputs = [ensemble_inputs(p, beam_width, min(count, beam_width)) for p in pathways]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(requests))

    def worker() -> None:
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                started = time.perf_counter()
                try:
                    client.infer(ENSEMBLE, inputs[i % len(inputs)], outputs=requested_outputs())
                except InferenceServerException as e:
                    with lock:
                        errors.append(str(e))
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)

    with grpcclient.InferenceServerClient(url) as client:
        client.infer(ENSEMBLE, inputs[0], outputs=requested_outputs())  # warm the path
        before = _counts(client)
        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        after = _counts(client)
    batch = {m: (after[m][0] - before[m][0]) / max(1, after[m][1] - before[m][1]) for m in MODELS}
    if errors and not latencies:
        raise RuntimeError(f"every request failed, e.g. {errors[0]}")
    ms = np.array(latencies or [np.nan]) * 1000
    return BenchRow(
        beam_width,
        concurrency,
        requests,
        len(latencies) / wall,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        batch,
        len(errors),
    )
