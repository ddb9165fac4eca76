"""Where a load level's CPU went: CPU seconds per role, read from Linux's /proc.

The bench's machine runs the load generator, the front end, Triton and every model's
python-backend stubs on the same cores, so the split says what limits throughput and MFU:
only the stubs' ONNX Runtime time does model FLOPs. Where /proc is missing (not Linux),
the split is empty rather than wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a live process, None once it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _stub_role(pid: int) -> str:
    """A python-backend stub's model, from the model.py path on its command line."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "triton"
    for arg in argv:
        if arg.endswith(b"/model.py"):
            return f"{Path(arg.decode()).parent.parent.name} stubs"
    return "triton"  # any other helper of Triton's


def roles(front_end: int, triton: int) -> dict[int, str]:
    """Process id -> role, for the processes that serve and the one that loads."""
    out = {os.getpid(): "load generator", front_end: "front end", triton: "triton"}
    for kid in _children(triton):
        out[kid] = _stub_role(kid)
    return out


def sample(pids: dict[int, str]) -> dict[int, float]:
    """CPU seconds of each process now (those gone are left out)."""
    out = {}
    for pid in pids:
        seconds = _cpu_seconds(pid)
        if seconds is not None:
            out[pid] = seconds
    return out


def cores_by_role(
    pids: dict[int, str], before: dict[int, float], after: dict[int, float], wall: float
) -> dict[str, float]:
    """Cores each role kept busy between two samples ``wall`` seconds apart."""
    out: dict[str, float] = {}
    for pid, role in pids.items():
        if pid in before and pid in after:
            out[role] = out.get(role, 0.0) + (after[pid] - before[pid]) / wall
    return out
