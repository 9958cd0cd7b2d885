"""A real ``redis-server`` process on a free loopback port.

The local cluster and the test fixtures both start Redis this way: the Debian
``redis-server`` binary (installed by ``make setup``), bound to 127.0.0.1 on a
free port, with its files in a private folder, stopped on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from tune.ray_env import free_port

BINARY_ENV = "INSPECTRAY_REDIS_SERVER"


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start or stop as expected."""


def find_redis_server() -> str:
    """Path of the redis-server binary (``$INSPECTRAY_REDIS_SERVER`` or ``PATH``).

    Raises:
        RedisServerError: not installed; says how to install it.
    """
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RedisServerError(f"{BINARY_ENV}={explicit} is not an executable file")
        return explicit
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            "redis-server is not installed; run `make setup` (installs the Debian package)"
        )
    return found


class RedisServer:
    """Start and stop one redis-server.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        port: TCP port; default a free one.
        workdir: folder for the server's files and log; default a new temp folder
            (removed on stop).
        appendonly: enable AOF persistence (off by default: a cache for tests).
        password: require this password (``requirepass``).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port(self.host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self.appendonly = appendonly
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of the server (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client connected to this server."""
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Launch redis-server and wait until it answers PING.

        Raises:
            RedisServerError: the binary is missing, exits, or never answers.
        """
        if self.process is not None:
            raise RedisServerError("this RedisServer is already running")
        binary = find_redis_server()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="inspectray-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                log = self._log_tail()
                self.process = None
                raise RedisServerError(
                    f"redis-server exited at start on port {self.port}: {stderr or log}"
                )
            try:
                # Another server may already own the port: only ours counts.
                if client.info("server")["process_id"] == self.process.pid:
                    return self
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RedisServerError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove a temp workdir."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def _log_tail(self) -> str:
        log = self.workdir / "redis.log" if self.workdir else None
        if log and log.exists():
            return "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
