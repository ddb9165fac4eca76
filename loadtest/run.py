"""`make loadtest`: a bounded headless Locust run against the front end.

If no process answers gRPC health at ``--host``, it starts the stack (``onerec serve``
with a local Triton, on the host's port), waits until the model serves, and stops it
afterwards. Locust's CSV and HTML go to ``--out``; the exit code is Locust's, which is
non-zero when any request failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


MODEL = "onerec.v1.Recommender"  # SERVING while inference through Triton works


def serving(host: str, service: str = "", timeout: float = 2.0) -> bool:
    """Health of ``service`` at ``host``: ``""`` is the process (it answers, maybe from a
    fallback), ``MODEL`` the model behind it."""
    with grpc.insecure_channel(host) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_stack(host: str, artifacts: str, log: Path) -> subprocess.Popen:
    port = host.rsplit(":", 1)[1]
    env = dict(os.environ, ONEREC_PORT=port, ONEREC_ARTIFACTS=artifacts)
    out = open(log, "w")  # noqa: SIM115 - the child holds it for its lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "onerec", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not serving(host, MODEL):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)  # not SIGKILL: it must stop its Triton
            raise RuntimeError(f"the stack did not come up; see {log}")
        time.sleep(0.5)
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="localhost:50051")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--run-time", default="30s")
    p.add_argument("--out", default="reports/loadtest")
    p.add_argument("--artifacts", default=os.environ.get("ONEREC_ARTIFACTS", "artifacts/synthetic"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stack = None
    if not serving(args.host):
        print(f"nothing serving at {args.host}: starting onerec serve (log: {out}/stack.log)")
        stack = start_stack(args.host, args.artifacts, out / "stack.log")
    elif not serving(args.host, MODEL):
        print(f"warning: {args.host} answers but its model is not ready: expect fallbacks")
    try:
        locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
        locust += ["--host", args.host, "--users", str(args.users)]
        locust += ["--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time]
        locust += ["--csv", str(out / "locust"), "--html", str(out / "locust.html")]
        locust += ["--exit-code-on-error", "1", "--only-summary"]
        env = dict(os.environ, ONEREC_ARTIFACTS=args.artifacts)
        return subprocess.run(locust, env=env).returncode
    finally:
        if stack is not None:  # SIGTERM lets onerec serve stop its own Triton too
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(120)
            except subprocess.TimeoutExpired:
                stack.kill()


if __name__ == "__main__":
    sys.exit(main())
