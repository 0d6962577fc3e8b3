"""The ``tritonserver`` process: start it on a model repository, watch its output, stop it.

This module owns one server's life: choosing its ports, its command line, spawning it (an
:class:`diffserve.engine.processes.ChildProcess` in a lifeline group, so it and its python-backend stubs die
with the process that started them), writing its whole output to a log file and its warnings and
errors to the ``diffserve.triton`` logger, waiting for readiness, and shutting it down (SIGTERM,
then SIGKILL of the whole group) with its work directory and shared-memory regions removed.
Where the binary comes from and how the stubs get our interpreter is ``distribution``'s;
restarting a server that died is ``supervisor``'s; ``serve_until_stopped`` is ``diffserve triton``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from diffserve.engine.processes import ChildProcess
from diffserve.triton_serving.distribution import (
    TritonDistribution, TritonLaunchError, find_libpython, prepare_launch, running_python_version,
)

__all__ = [
    "MODEL_CONTROL_MODES",
    "TritonLaunchError",
    "TritonServer",
    "TritonServerConfig",
    "find_free_port",
    "serve_until_stopped",
]

LOGGER = logging.getLogger(__name__)
#: Logger receiving the server's warnings and errors (every other line at DEBUG).
SERVER_LOGGER = logging.getLogger("diffserve.triton")

MODEL_CONTROL_MODES = ("none", "explicit")
_TAIL_LINES = 40
_LOG_LINE_RE = re.compile(r"^([IWE])\d{4} ")
# Messages Triton prints as errors/warnings on every CPU-only host; logged at WARNING at most and
# left out of the "errors reported by the server" section of launch errors.
_HARMLESS_ON_CPU = (
    "Failed to initialize NVML",
    "DCGM",
    "CudaDriverHelper has not been initialized",
    "Unable to allocate pinned system memory",
    "failed to allocate pinned system memory: no pinned memory pool",
    "CUDA driver version is insufficient",
)


# Servers still running at interpreter exit are stopped (Triton runs in its own session, so it
# would otherwise outlive a Python process that forgot to call stop()).
_LIVE_SERVERS: set[TritonServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop(timeout=10)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it).

    There is an unavoidable race between this check and the server binding the port; if another
    process grabs it first, Triton exits and :meth:`TritonServer.start` raises with the log.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class TritonServerConfig:
    """How to run Triton.

    ``model_control_mode="none"`` loads every model of the repository at start-up, and a model
    that fails to load makes Triton exit, so :meth:`TritonServer.start` raises
    :class:`TritonLaunchError` carrying the model's error (strict loading). With
    ``"explicit"``, only ``load_models`` are loaded at start-up; an empty list loads nothing
    (Triton's semantics: load later through the repository API) and ``["*"]`` loads all.
    Ports left at ``None`` are picked free when the :class:`TritonServer` is created. All URLs are
    ``host:port`` strings as the ``tritonclient`` packages expect them.
    ``python_version`` and ``pytriton_root`` override what is detected (mainly for tests).
    """

    repository: Path
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    host: str = "127.0.0.1"
    log_verbose: int = 0
    model_control_mode: str = "none"
    load_models: list[str] = field(default_factory=list)
    #: importable from model.py files; the project root is always added.
    extra_pythonpath: list[Path] = field(default_factory=list)
    #: server stdout/stderr are appended here; "diffserve.triton" gets warnings and errors (the rest at DEBUG).
    log_file: Path | None = None
    startup_timeout_s: float = 120.0
    #: how long a stopping Triton waits for in-flight requests and model unloads before it exits
    #: anyway (``--exit-timeout-secs``, whole seconds; Triton's default is 30).
    exit_timeout_s: float = 30.0
    #: Triton's auto-complete starts an extra stub per python model (~1.5 s each); off by
    #: default since diffserve writes complete config.pbtxt files.
    auto_complete_config: bool = False
    #: appended verbatim to the tritonserver command line (last occurrence wins in Triton).
    extra_args: list[str] = field(default_factory=list)
    python_version: str | None = None
    pytriton_root: Path | None = None

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control_mode must be one of {MODEL_CONTROL_MODES}, "
                f"got {self.model_control_mode!r}"
            )
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("load_models requires model_control_mode='explicit'")
        self.extra_pythonpath = [Path(p) for p in self.extra_pythonpath]
        if self.log_file is not None:
            self.log_file = Path(self.log_file)
        if self.startup_timeout_s <= 0:
            raise ValueError("startup_timeout_s must be positive")
        if self.exit_timeout_s < 0:
            raise ValueError("exit_timeout_s must not be negative")


def _connect_host(host: str) -> str:
    """Address clients use to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


class TritonServer:
    """One ``tritonserver`` process; use as a context manager or call start()/stop()."""

    def __init__(self, config: TritonServerConfig) -> None:
        self.config = config
        host = config.host
        used: set[int] = set()

        def pick(port: int | None) -> int:
            if port is not None:
                used.add(port)
                return port
            for _ in range(20):
                candidate = find_free_port("127.0.0.1" if host in ("", "0.0.0.0", "::") else host)
                if candidate not in used:
                    used.add(candidate)
                    return candidate
            raise TritonLaunchError(f"could not find free ports on {host}")

        self.http_port = pick(config.http_port)
        self.grpc_port = pick(config.grpc_port)
        self.metrics_port = pick(config.metrics_port)
        self._child: ChildProcess | None = None
        self._workdir: Path | None = None
        self._shm_prefix = ""
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._errors: collections.deque[str] = collections.deque(maxlen=10)
        self._lock = threading.Lock()
        self._returncode: int | None = None

    # ------------------------------------------------------------------ URLs / state
    @property
    def http_url(self) -> str:
        return f"{_connect_host(self.config.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.config.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{_connect_host(self.config.host)}:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def process_group(self) -> int | None:
        """Process group of the server and its stubs (that of its :class:`Lifeline` watchdog)."""
        return self._child.pgid if self._child is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code once the process has ended (None while it runs or before it started)."""
        if self._child is not None:
            return self._child.returncode
        return self._returncode

    def is_alive(self) -> bool:
        """True while the server process runs."""
        return self._child is not None and self._child.alive()

    def is_ready(self) -> bool:
        """True when the process runs and ``/v2/health/ready`` answers 200."""
        if not self.is_alive():
            return False
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=2.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def log_tail(self) -> list[str]:
        """The last lines the server printed (up to 40)."""
        with self._lock:
            return list(self._tail)

    # ------------------------------------------------------------------ start
    def start(self, abort: threading.Event | None = None) -> None:
        """Spawn the server and block until it is ready (or raise :class:`TritonLaunchError`).

        Setting ``abort`` (from another thread) ends a start-up in progress: the server is
        stopped and :class:`TritonLaunchError` raised.
        """
        if self.is_alive():
            raise TritonLaunchError(f"Triton is already running (pid {self.pid})")
        if self._child is not None:  # died on its own since the last start: reap and clean up
            self.stop()
        cfg = self.config
        repository = cfg.repository.resolve()
        if not repository.is_dir():
            raise TritonLaunchError(f"model repository {repository} is not a directory")

        dist = TritonDistribution.locate(cfg.pytriton_root)
        running = running_python_version()
        version = cfg.python_version or running
        stub = dist.stub_for(version)
        if version != running:
            raise TritonLaunchError(
                f"python_version={version} differs from the running interpreter ({running}); the "
                "stub must match the interpreter whose libpython and site-packages it uses"
            )
        libpython = find_libpython()

        self._reset_state()
        self._workdir = Path(tempfile.mkdtemp(prefix="diffserve-triton-"))
        try:
            backend_dir, env = prepare_launch(self._workdir, dist, stub, version, libpython, cfg.extra_pythonpath)
            cmd = self._command(dist, repository, backend_dir)
        except OSError as exc:
            self._cleanup_files()
            raise TritonLaunchError(f"cannot prepare Triton work directory: {exc}") from exc

        LOGGER.info(
            "starting Triton: repository=%s http=%s grpc=%s metrics=%s log=%s",
            repository, self.http_url, self.grpc_url, self.metrics_url, cfg.log_file or "(not kept)",
        )
        LOGGER.debug("command: %s", " ".join(cmd))
        try:
            # A lifeline group: stop() kills the stubs too, and all die with this process.
            self._child = ChildProcess(cmd, name="Triton", env=env, log=cfg.log_file, on_line=self._on_line,
                                       lifeline=True, tail_lines=_TAIL_LINES).start()
        except OSError as exc:
            self._cleanup_files()
            raise TritonLaunchError(f"cannot execute {dist.binary}: {exc}") from exc
        _LIVE_SERVERS.add(self)
        try:
            self.wait_ready(cfg.startup_timeout_s, abort)
        except BaseException:
            self.stop(timeout=10)
            raise
        LOGGER.info("Triton ready (pid %d) at http=%s grpc=%s", self._child.pid, self.http_url,
                    self.grpc_url)

    def wait_ready(self, timeout: float, abort: threading.Event | None = None) -> None:
        """Poll readiness; raise :class:`TritonLaunchError` if the server dies, times out or
        ``abort`` is set."""
        if self._child is None:
            raise TritonLaunchError("Triton has not been started")
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            code = self._child.returncode
            if code is not None:
                self._child.drain_output()
                raise TritonLaunchError(
                    self._failure_message(f"Triton exited during start-up with code {code}")
                )
            if self.is_ready():
                return
            if abort is not None and abort.is_set():
                raise TritonLaunchError("Triton start-up aborted")
            if time.monotonic() >= deadline:
                raise TritonLaunchError(
                    self._failure_message(
                        f"Triton did not become ready within {timeout:g} s "
                        f"(http://{self.http_url}/v2/health/ready); slow model initialisation "
                        "needs a larger startup_timeout_s"
                    )
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float | None = None) -> int:
        """Stop the server (SIGTERM, wait ``timeout``, SIGKILL the group); return its exit code.

        ``timeout`` defaults to the configured exit timeout plus 10 s, so Triton normally ends on
        its own. Idempotent: later calls return the same code; returns 0 when never started.
        """
        if timeout is None:
            timeout = math.ceil(self.config.exit_timeout_s) + 10.0
        child = self._child
        if child is None:
            self._cleanup_files()
            return self._returncode if self._returncode is not None else 0
        if child.alive():
            LOGGER.info("stopping Triton (pid %d)", child.pid)
        # SIGTERM to the server alone, SIGKILL to its group after the timeout; the python-backend
        # stubs live in that group, and none survive it.
        self._returncode = child.stop(timeout)
        self._child = None
        _LIVE_SERVERS.discard(self)
        self._cleanup_files()
        LOGGER.info("Triton stopped with exit code %s", self._returncode)
        return self._returncode

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _reset_state(self) -> None:
        with self._lock:
            self._tail.clear()
            self._errors.clear()
        self._returncode = None
        self._level = logging.INFO
        self._shm_prefix = f"diffserve_{os.getpid()}_{secrets.token_hex(4)}_"


    def _command(self, dist: TritonDistribution, repository: Path, backend_dir: Path) -> list[str]:
        cfg = self.config
        cmd = [
            str(dist.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={cfg.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={cfg.log_verbose}",
            f"--model-control-mode={cfg.model_control_mode}",
            f"--exit-timeout-secs={math.ceil(cfg.exit_timeout_s)}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if not cfg.auto_complete_config:
            cmd.append("--disable-auto-complete-config")
        cmd += [f"--load-model={name}" for name in cfg.load_models]
        cmd += list(cfg.extra_args)
        return cmd

    def _on_line(self, line: str) -> None:
        """Each line of the server's output (the log file has them all): to the tail buffer, and
        warnings and errors to the logger, the rest at DEBUG (a model repository's start-up is a few
        hundred lines of Triton's INFO)."""
        match = _LOG_LINE_RE.match(line)
        harmless = any(s in line for s in _HARMLESS_ON_CPU)
        if match:  # unprefixed lines continue the last prefixed one, at its level
            level = {"I": logging.DEBUG, "W": logging.WARNING, "E": logging.ERROR}[match[1]]
            self._level = logging.DEBUG if harmless else level
        with self._lock:
            self._tail.append(line)
            if (match and match[1] == "E" or line.startswith("error:")) and not harmless:
                self._errors.append(line)
        SERVER_LOGGER.log(self._level, "%s", line)

    def _failure_message(self, headline: str) -> str:
        with self._lock:
            errors = list(self._errors)
            tail = list(self._tail)
        parts = [headline + "."]
        if errors:
            # Triton escapes newlines inside messages (model tracebacks); unfold them.
            unfolded = [e.replace("\\n", "\n    ").rstrip() for e in errors]
            parts.append("Errors reported by the server:\n  " + "\n  ".join(unfolded))
        if tail:
            parts.append(f"Last {len(tail)} log lines:\n" + "\n".join(tail))
        if self.config.log_file is not None:
            parts.append(f"Full log: {self.config.log_file}")
        return "\n".join(parts)

    def _cleanup_files(self) -> None:
        if self._shm_prefix:
            shm = Path("/dev/shm")
            if shm.is_dir():
                for region in shm.glob(self._shm_prefix + "*"):
                    with contextlib.suppress(OSError):
                        region.unlink()
                        LOGGER.debug("removed leftover shared memory region %s", region)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# ---------------------------------------------------------------------- run in the foreground
def serve_until_stopped(config: TritonServerConfig) -> int:
    """Start Triton, print its URLs, block until SIGINT/SIGTERM (or its death), stop it cleanly.

    What ``diffserve triton`` runs. Returns 0 after a requested stop, 1 when the server died on
    its own, 2 when it could not start (the reason is logged), 130 when start-up was interrupted.
    """
    stop_requested = threading.Event()
    started = False

    def on_signal(signum: int, _frame: object) -> None:
        if not started:  # abort a (possibly long) start-up; start() cleans up on the way out
            raise KeyboardInterrupt(f"signal {signum}")
        stop_requested.set()

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    server = TritonServer(config)
    try:
        try:
            server.start()
        except TritonLaunchError as exc:
            LOGGER.error("%s", exc)
            return 2
        except KeyboardInterrupt:
            LOGGER.warning("start-up interrupted")
            return 130
        started = True
        sys.stdout.write(
            f"Triton ready\n  http:    {server.http_url}\n  grpc:    {server.grpc_url}\n"
            f"  metrics: {server.metrics_url}\nPress Ctrl-C to stop.\n"
        )
        sys.stdout.flush()
        died = False
        while not stop_requested.wait(1.0):
            if not server.is_alive():
                died = True
                LOGGER.error("Triton exited unexpectedly:\n%s", "\n".join(server.log_tail()))
                break
        server.stop()
        return 1 if died else 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
