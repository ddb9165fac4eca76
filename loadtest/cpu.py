"""Where a load level's CPU went: cores busy per role, from psutil.

The bench's machine runs the load generator, the front end, Triton and every model's
python-backend stubs on the same cores, so the split says what limits throughput and MFU:
only the stubs' ONNX Runtime time does model FLOPs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil


def stub_model(process: psutil.Process) -> str | None:
    """The model a python-backend stub serves (its model.py's directory); None for any
    other process."""
    argv = process.cmdline()
    if process.name() == "triton_python_backend_stub" and len(argv) > 1:
        return Path(argv[1]).parents[1].name
    return None


def roles(front_end: int, triton: int) -> dict[psutil.Process, str]:
    """The processes that serve and the one that loads, each with its role."""
    out = {
        psutil.Process(): "load generator",
        psutil.Process(front_end): "front end",
        psutil.Process(triton): "triton",
    }
    for child in psutil.Process(triton).children():
        model = stub_model(child)
        out[child] = f"{model} stubs" if model else "triton"
    return out


def sample(processes: dict[psutil.Process, str]) -> dict[psutil.Process, float]:
    """User plus system CPU seconds of each process now (those gone are left out)."""
    out = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            out[process] = times.user + times.system
    return out


def cores_by_role(
    processes: dict[psutil.Process, str],
    before: dict[psutil.Process, float],
    after: dict[psutil.Process, float],
    wall: float,
) -> dict[str, float]:
    """Cores each role kept busy between two samples ``wall`` seconds apart."""
    out: dict[str, float] = {}
    for process, role in processes.items():
        if process in before and process in after:
            out[role] = out.get(role, 0.0) + (after[process] - before[process]) / wall
    return out
