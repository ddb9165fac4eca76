"""A real ``redis-server`` (Debian's package) for the tests, ``make bench`` and
``make chaos``: on a free port, its AOF in a directory of its own, fsynced before every
reply (``appendfsync always``), so a ``kill -9`` loses nothing it acknowledged."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from loadtest.net import free_ports


class RedisServer:
    """``start()``, ``kill()`` and ``start()`` again: the same port, directory and data."""

    def __init__(self, directory: Path, port: int | None = None, fsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary, self.dir, self.fsync = binary, Path(directory), fsync
        self.port = port or free_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> RedisServer:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", self.fsync]
        argv += ["--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    log = (self.dir / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def flush(self, db: int = 0) -> str:
        """An empty database ``db``; its URL."""
        with redis.Redis.from_url(self.url(db)) as client:
            client.flushdb()
        return self.url(db)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; wait for the exit unless it only stops the process (SIGSTOP)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig != signal.SIGSTOP:
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
