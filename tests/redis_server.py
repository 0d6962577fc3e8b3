"""A real ``redis-server`` for the tests: found or installed, started on a free loopback port, stopped after.

CI machines have no Redis, so :func:`redis_server_binary` installs Debian's package (7.0.x) with
apt-get when ``redis-server`` is not on PATH and the tests run as root. :class:`RedisServer` runs one
server process in a temp dir with append-only persistence (``appendfsync always``: an acknowledged
write is on disk, so a test may kill -9 the server and find every accepted job after the restart)
and no RDB snapshots. Its port is fixed at construction, so a fault test can :meth:`~RedisServer.kill`
or :meth:`~RedisServer.stop` it and :meth:`~RedisServer.start` it again on the same address.

Fixtures: ``redis_server`` (session; the running server) and ``redis_url`` (per test: the server is
up again if a test left it down, and empty). A test module takes them with
``from tests.redis_server import redis_server, redis_url  # noqa: F401``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from diffserve.engine.processes import ChildNotReady, ChildProcess

logger = logging.getLogger(__name__)

MIN_VERSION = (7, 0)


def redis_server_binary() -> str:
    """Path of a ``redis-server`` >= 7, installing Debian's package as root when there is none."""
    found = shutil.which("redis-server")
    if found is None:
        if os.geteuid() != 0:
            pytest.fail("redis-server is not installed and the tests are not root: install Redis >= 7 "
                        "(apt-get install redis-server) to run the Redis store tests")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            # A fresh image often has no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
        found = shutil.which("redis-server") or "/usr/bin/redis-server"
    out = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    if match is None or (int(match[1]), int(match[2])) < MIN_VERSION:
        pytest.fail(f"{found} is too old ({out.strip()}); the Redis store needs Redis >= 7")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:<port>, data in ``directory``; restartable on its port."""

    def __init__(self, directory: Path, *, binary: str | None = None, port: int | None = None,
                 appendfsync: str = "always", password: str | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = binary or redis_server_binary()
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.password = password
        """``requirepass``: clients must authenticate (the shipped deployments set one)."""
        self.log_file = self.directory / "redis.log"
        self._proc: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def start(self, timeout_s: float = 20.0) -> None:
        if self.running:
            return
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes", "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(self.log_file),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self._proc = ChildProcess(args, name="redis-server").start()
        try:
            self._proc.wait_ready(self._ping, timeout_s)
        except ChildNotReady as exc:
            if exc.returncode is not None:
                raise RuntimeError(f"redis-server exited with {exc.returncode}; see {self.log_file}") from None
            self.kill()
            raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:g} s") from None
        logger.info("redis-server up on port %d (pid %d)", self.port, self._proc.pid)

    def _ping(self) -> bool:
        # Raw RESP, so this helper needs no client library; LOADING (AOF replay) is not ready yet.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password is not None:
                    secret = self.password.encode()
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM: Redis flushes and fsyncs its append-only file first; SIGKILL after
        ``timeout_s``)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(timeout_s)

    def kill(self) -> None:
        """kill -9, as a crash or the OOM killer does."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server, running (a fault test may have left it down) and emptied."""
    import redis

    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
