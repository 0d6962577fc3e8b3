"""Keeping a Triton server this process started running: restart it when it dies, with backoff.

``TritonSupervisor`` owns the policy (how often to look, how long to wait between attempts, when
the wait resets) and the state a liveness probe reads (restarts so far, the last failure, how long
the server has been down). Starting, stopping and reaping the server are ``TritonServer``'s; that
the server and its stubs die with this process is the lifeline's (``diffserve.engine.processes``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffserve.triton_serving.server import TritonServer

__all__ = ["TritonSupervisor"]

LOGGER = logging.getLogger(__name__)


def _short_reason(exc: BaseException) -> str:
    """One line for a launch error: its headline and the server's first reported error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) > 2 and lines[1].startswith("Errors reported by the server"):
        return f"{lines[0]} {lines[2]}"
    return lines[0]



class TritonSupervisor:
    """Keeps a :class:`TritonServer` this process started running: restarts it when it dies.

    :meth:`start` starts the server (raising like :meth:`TritonServer.start`) and a watcher
    thread that polls the process every ``poll_s``. When the server has died, the watcher reaps
    it and its stubs at once, waits ``backoff_s`` and starts it again on the same ports (so
    clients' URLs stay right); each attempt is logged, counted in :attr:`restarts` and reported
    to ``on_restart``. The wait doubles after every attempt up to ``max_backoff_s`` and is back to
    ``backoff_s`` once the server has stayed up for ``max_backoff_s``, so a server that crashes
    right after start-up is retried ever more slowly instead of in a tight loop.
    :meth:`down_for` says how long the server has been down (for liveness probes).
    """

    def __init__(self, server: TritonServer, *, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 poll_s: float = 0.5, on_restart: Callable[[], None] | None = None) -> None:
        if backoff_s <= 0 or max_backoff_s < backoff_s or poll_s <= 0:
            raise ValueError("need 0 < backoff_s <= max_backoff_s and poll_s > 0")
        self.server = server
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.poll_s = poll_s
        self.on_restart = on_restart
        self.restarts = 0
        """Restart attempts so far (successful or not)."""
        self.last_error: str | None = None
        """First line of the last failed restart's error, None once the server is back."""
        self._down_since: float | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the server (blocking until ready) and the watcher thread."""
        self.server.start(abort=self._stopping)
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()

    def down_for(self) -> float | None:
        """Seconds since the server was found dead, None while it is up (or being stopped)."""
        since = self._down_since
        return None if since is None or self._stopping.is_set() else time.monotonic() - since

    def stop(self, timeout: float | None = None) -> int:
        """Stop watching (ending a restart in progress), then stop the server; its exit code."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(60)
        return self.server.stop(timeout)

    def _watch(self) -> None:
        backoff = self.backoff_s
        up_since = time.monotonic()
        while not self._stopping.wait(self.poll_s):
            if self.server.is_alive():
                if time.monotonic() - up_since >= self.max_backoff_s:
                    backoff = self.backoff_s
                continue
            self._down_since = time.monotonic()
            pid, code = self.server.pid, self.server.returncode
            LOGGER.error("Triton (pid %s) exited with code %s; restarting it in %.1f s; last lines:\n%s",
                         pid, code, backoff, "\n".join(self.server.log_tail()[-5:]))
            self.server.stop(timeout=5)  # reap it, kill its stubs, free its shared memory now
            backoff = self._restart(backoff)
            up_since = time.monotonic()

    def _restart(self, backoff: float) -> float:
        """Attempt restarts, ``backoff`` apart and doubling, until one succeeds or stop() is
        called; returns the wait before the next restart (doubled after each attempt)."""
        while not self._stopping.wait(backoff):
            self.restarts += 1
            if self.on_restart is not None:
                self.on_restart()
            down = time.monotonic() - (self._down_since or time.monotonic())
            LOGGER.warning("restarting Triton (restart %d; down for %.1f s)", self.restarts, down)
            try:
                self.server.start(abort=self._stopping)
            except Exception as exc:  # noqa: BLE001 - whatever it was, try again later
                if self._stopping.is_set():
                    break
                self.last_error = _short_reason(exc)
                backoff = min(backoff * 2, self.max_backoff_s)
                LOGGER.error("Triton restart %d failed: %s; next attempt in %.1f s", self.restarts,
                             self.last_error, backoff)
                continue
            LOGGER.info("Triton is back (pid %s) after %.1f s down", self.server.pid,
                        time.monotonic() - (self._down_since or time.monotonic()))
            self._down_since = None
            self.last_error = None
            break
        return min(backoff * 2, self.max_backoff_s)

