"""`make loadtest` in miniature: 5 seconds of Locust against a real front end and Triton."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import grpc
from conftest import SERVING, Server

RUN = Path(__file__).parents[1] / "loadtest" / "run.py"


def test_five_second_load_has_no_failures(served, tmp_path) -> None:
    server = Server(served, tmp_path, served[0].grpc_url)
    channel = grpc.insecure_channel(server.address)
    try:
        server.wait_health(SERVING, channel)
        out = tmp_path / "loadtest"
        argv = [sys.executable, str(RUN), "--host", server.address, "--users", "8"]
        argv += ["--spawn-rate", "8", "--run-time", "5s", "--out", str(out)]
        argv += ["--artifacts", str(served[4])]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        with open(out / "locust_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
        total = rows["Aggregated"]
        assert int(total["Request Count"]) > 20 and int(total["Failure Count"]) == 0
        assert any(name.startswith("Recommend") for name in rows)
        assert "LogEvents" in rows
        assert (out / "locust.html").stat().st_size > 0
    finally:
        channel.close()
        server.stop()
