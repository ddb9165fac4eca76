"""Keep a local ``tritonserver`` running: restart it when it dies, with backoff.

``onerec serve`` (without ``--triton-url``) and ``onerec triton`` run Triton as a child.
When it dies (a crash, an OOM kill, ``kill -9``), the supervisor starts it again on the
same ports and model repository, waiting ``min_backoff_s`` at first and doubling up to
``max_backoff_s`` while restarts keep failing; a Triton that stayed up ``stable_s`` resets
the wait. Meanwhile the front end answers from its fallback, and its health loop returns
to SERVING by itself once a real inference succeeds again.

The watcher is a thread of its own: the kernel sends Triton SIGTERM when the thread that
started it exits (``PR_SET_PDEATHSIG``), so restarts come from a thread that lives as
long as the supervision does.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from server.triton_launcher import TritonProcess

log = logging.getLogger(__name__)


class TritonSupervisor:
    def __init__(
        self,
        process: TritonProcess,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.process = process
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.stable_s, self.start_timeout_s = stable_s, start_timeout_s
        self.restarts = 0
        self.on_restart: list[Callable[[], None]] = []  # called after each successful restart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return self.process.grpc_url

    def start(self) -> TritonSupervisor:
        """Start Triton (raising if the first start fails), then watch it."""
        self.process.start(self.start_timeout_s)
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        failures, up_since = 0, time.monotonic()
        while not self._stop.is_set():
            proc = self.process.proc
            assert proc is not None
            code = proc.wait()
            if self._stop.is_set():
                return
            self.process.reap()
            if time.monotonic() - up_since >= self.stable_s:
                failures = 0
            delay = min(self.max_backoff_s, self.min_backoff_s * 2**failures)
            log.error("tritonserver exited with %s; restarting in %.1fs", code, delay)
            while not self._stop.wait(delay):
                try:
                    self.process.start(self.start_timeout_s)
                except Exception as e:  # keep trying: a restart can fail while ports free
                    failures += 1
                    delay = min(self.max_backoff_s, self.min_backoff_s * 2**failures)
                    log.error("tritonserver restart failed (%s); next try in %.1fs", e, delay)
                    continue
                if self._stop.is_set():  # stopped while it was starting
                    self.process.stop()
                    return
                self.restarts += 1
                failures += 1
                up_since = time.monotonic()
                log.warning("tritonserver restarted (%d restarts so far)", self.restarts)
                for callback in self.on_restart:
                    callback()
                break

    def stop(self) -> None:
        """Stop watching, then stop Triton."""
        self._stop.set()
        self.process.stop()
        if self._thread is not None:
            self._thread.join(self.start_timeout_s)
        self.process.stop()  # one the watcher may have started while we stopped

    def __enter__(self) -> TritonSupervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(supervisor: TritonSupervisor) -> int:
    """``onerec triton``: Triton, restarted whenever it dies, until SIGINT/SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with supervisor:
        stop.wait()
    return 0
