"""Open-loop load: calls sent on a fixed schedule, whatever the server does. Each call is
handed the time it was due, so its latency counts from then and a stall is not hidden by
the sender waiting for it (no coordinated omission)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np


def on_schedule(
    rate: float,
    seconds: float,
    call: Callable[[float, np.random.Generator], None],
    workers: int = 32,
    seed: int | None = None,
) -> tuple[float, float]:
    """Run ``call(due, rng)`` ``rate`` times a second for ``seconds`` (``time.monotonic``
    clock), spread over ``workers`` threads, each with a generator of its own; returns the
    schedule's (start, end)."""
    n = max(1, int(rate * seconds))
    start = time.monotonic() + 0.1
    schedule, lock = iter(range(n)), threading.Lock()

    def worker(rng: np.random.Generator) -> None:
        while True:
            with lock:
                i = next(schedule, None)
            if i is None:
                return
            due = start + i / rate
            time.sleep(max(0.0, due - time.monotonic()))
            call(due, rng)

    seeds = np.random.SeedSequence(seed).spawn(workers)
    threads = [
        threading.Thread(target=worker, args=(np.random.default_rng(s),), daemon=True)
        for s in seeds
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return start, time.monotonic()
