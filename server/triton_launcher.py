"""Start the real ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 with only the python backend, which runs on the CPU. It
needs four things the wheel does not arrange by itself (see DESIGN.md):

* ``LD_LIBRARY_PATH`` with ``site-packages/nvidia_pytriton.libs``;
* a backend directory whose ``python/`` also holds the ``triton_python_backend_stub``
  built for this interpreter's version (the wheel keeps one per version aside);
* ``--cache-directory`` at the wheel's ``caches``;
* this venv's ``bin`` first on ``PATH``, so the stub imports the venv's packages.

:class:`TritonProcess` starts it, waits until the server and every model are ready,
proves readiness with a real tiny inference (Triton can report ready after a python stub
has died), forwards its log lines to ours, and stops it with SIGTERM, then SIGKILL. On
Linux the kernel also sends it SIGTERM when the thread that started it dies, even by
``kill -9``, so a crashed launcher never leaves a Triton holding its ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.http as httpclient

from onerec.runtime.layout import DECODER, ENCODER, ENSEMBLE, REWARD, REWARD_ONNX

log = logging.getLogger(__name__)
triton_log = logging.getLogger(f"{__name__}.tritonserver")  # its own lines, by severity

MODELS = (ENCODER, DECODER, ENSEMBLE)


def served_models(repository: Path) -> tuple[str, ...]:
    """The models to load: the three that decode, and the reward model where the build
    wrote one (its directory is tracked, its ONNX file is not)."""
    reward = (Path(repository) / REWARD / "1" / REWARD_ONNX).is_file()
    return (*MODELS, REWARD) if reward else MODELS


PR_SET_PDEATHSIG = 1
# Looked up now: after fork, the child must not take the locks a ctypes lookup needs.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (thread) dies."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _env_port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class TritonPorts:
    """Triton's ports; each defaults to DESIGN.md's and reads an environment override."""

    http: int = field(default_factory=lambda: _env_port("TRITON_HTTP_PORT", 8000))
    grpc: int = field(default_factory=lambda: _env_port("TRITON_GRPC_PORT", 8001))
    metrics: int = field(default_factory=lambda: _env_port("TRITON_METRICS_PORT", 8002))


def pytriton_dir() -> Path:
    import pytriton  # the wheel is only needed where Triton is launched locally

    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(cache: Path | None = None) -> Path:
    """A copy of the wheel's backends with this Python's stub in ``python/``.

    Made once per venv and interpreter version; the copy is assembled aside and renamed
    into place, so concurrent launchers never see half a directory.
    """
    source = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = (cache or Path(sys.prefix) / "triton-backends") / version
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "backends", staging)
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {version}")
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    try:
        staging.rename(target)
    except OSError:  # another launcher won the race; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return target


def triton_command(
    repository: Path,
    ports: TritonPorts,
    log_verbose: int = 0,
    extra: list[str] | None = None,
    shm_prefix: str = "triton_python_backend_shm_region_",
) -> tuple[list[str], dict[str, str]]:
    """The ``tritonserver`` argv and environment for ``repository``; the python backend's
    shared-memory regions are named ``/dev/shm/<shm_prefix>...``."""
    root = pytriton_dir()
    libs = root.parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    argv = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={backend_directory()}",
        f"--cache-directory={root / 'caches'}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in served_models(repository)),
        f"--log-verbose={log_verbose}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        *(extra or []),
    ]
    return argv, env


class TritonProcess:
    """A running ``tritonserver``; a context manager that waits for ready and stops it."""

    def __init__(
        self,
        repository: str | Path,
        ports: TritonPorts | None = None,
        probe: Callable[[str], None] | None = None,
        extra_args: list[str] | None = None,
        log_verbose: int = 0,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.ports = ports or TritonPorts()
        self.probe = probe
        self.extra_args = extra_args or []
        self.log_verbose = log_verbose
        self.proc: subprocess.Popen[str] | None = None
        self.lines: deque[str] = deque(maxlen=2000)  # the recent log, for error messages
        self._pump: threading.Thread | None = None
        self.launches = 0
        self.shm_prefix = ""

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self, timeout: float = 180.0) -> TritonProcess:
        self.launches += 1
        self.shm_prefix = f"onerec_triton_{os.getpid()}_{id(self):x}_{self.launches}_"
        argv, env = triton_command(
            self.repository, self.ports, self.log_verbose, self.extra_args, self.shm_prefix
        )
        log.info("starting %s", " ".join(argv))
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # our SIGINT is for us; Triton gets an orderly SIGTERM
            preexec_fn=_die_with_parent,
        )
        self._pump = threading.Thread(target=self._forward_logs, daemon=True)
        self._pump.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _forward_logs(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            self.lines.append(line)
            level = logging.WARNING if line[:1] in ("E", "W") else logging.INFO
            triton_log.log(level, "%s", line)

    def wait_ready(self, timeout: float) -> None:
        """Server live and every model ready, then one real inference through ``probe``."""
        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(self.http_url)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    tail = "\n".join(list(self.lines)[-30:])
                    raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{tail}")
                try:
                    models = served_models(self.repository)
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        break
                except Exception:  # connection refused while it starts
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s")
                time.sleep(0.25)
        finally:
            client.close()
        if self.probe is not None:
            self.probe(self.grpc_url)
        log.info("triton ready: http %s grpc %s", self.http_url, self.grpc_url)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds for the models to unload, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.reap()
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver ignored SIGTERM for %.0fs; killing it", grace)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.reap()
        if self._pump is not None:
            self._pump.join(5)
        return self.proc.returncode

    def reap(self) -> None:
        """After Triton exited: kill what it left behind. A Triton killed by a signal
        leaves its python backend stubs running, orphaned, and their shared memory in
        /dev/shm; the stubs share its process group (it leads its own session)."""
        assert self.proc is not None and self.proc.poll() is not None
        with contextlib.suppress(ProcessLookupError):  # nothing left: an orderly exit
            os.killpg(self.proc.pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
