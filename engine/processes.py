"""Child processes: the one place that starts, watches and stops another program.

The Triton launcher, the benchmarks, ``diffserve demo`` and the tests all run servers as child
processes. They share this module so that every child is handled the same way: started in a
process group of its own (so stopping it reaches whatever it started), its output read by a thread
(so it never blocks on a full pipe) into a tail kept for error messages, optionally a log file and
a per-line callback; readiness waited for by a line or a predicate, with an error that carries the
exit code and the last lines when the child died; stopped with SIGTERM to the group, SIGKILL after
a grace period, and the group's stragglers killed once the leader is gone. A :class:`Lifeline`
group additionally dies with this process however it ends (Triton needs that: its python-backend
stubs must not outlive the server that started it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal as signals
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

LOGGER = logging.getLogger("diffserve.processes")

# The Lifeline watchdog, run as `python -I -S -c`: it blocks on the read end of a pipe whose only
# write end the launching process holds, so end-of-file means that process is gone, however it ended
# (SIGKILL and the OOM killer included); it then SIGKILLs its own process group. Signals a terminal
# or a group-wide `kill -TERM` sends are ignored: the watchdog must outlive what it guards.
_WATCHDOG_SOURCE = """\
import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
fd = int(sys.argv[1])
while os.read(fd, 4096):
    pass
os.killpg(0, signal.SIGKILL)
"""


class ChildNotReady(RuntimeError):
    """A child did not become ready: it exited (``returncode`` set) or the wait timed out."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class Lifeline:
    """A process group that dies with the process that created it, whatever kills that process.

    Creating one starts a tiny watchdog process as the leader of a new process group and keeps the
    write end of a pipe whose read end only the watchdog holds. Processes started with
    ``process_group=lifeline.pgid`` join the group, and so do their children. When this process
    exits or is killed, the kernel closes the write end; the watchdog reads end-of-file and SIGKILLs
    the group. A parent-death signal (PR_SET_PDEATHSIG) would not do: it fires when the *thread*
    that forked exits, and reaches only the direct child, not its children. Processes this one forks
    without exec (``multiprocessing`` "fork") inherit the write end and keep the group alive.
    """

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()  # both close-on-exec: no other child inherits them
        try:
            self._watchdog: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG_SOURCE, str(read_fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(read_fd,), process_group=0,
            )
        except BaseException:
            os.close(self._write_fd)
            raise
        finally:
            os.close(read_fd)
        self.pgid = self._watchdog.pid
        """Process group id to start members in (the watchdog's pid)."""

    def close(self) -> None:
        """Kill every member of the group now and reap the watchdog (idempotent)."""
        if self._watchdog is None:
            return
        os.close(self._write_fd)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signals.SIGKILL)
        self._watchdog.wait()
        self._watchdog = None

    def alive_members(self) -> list[int]:
        """Pids of the group's live processes (from /proc), the watchdog included."""
        members = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # Fields after the parenthesised command: state ppid pgrp ...
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
        return members


class ChildProcess:
    """``cmd`` run in a process group of its own (or in a :class:`Lifeline` group, ``lifeline=True``).

    Its stdout (and stderr, unless ``stderr`` names a file to append it to) is read line by line:
    each line goes to ``log`` (appended) when given, to ``on_line``, and to :meth:`tail`; with
    ``pipe_output=False`` the child writes to this process's stdout and stderr instead. ``stop``
    sends SIGTERM to the whole group (in a lifeline group to the leader alone, which ends its own
    children in order), and always SIGKILLs what is left of the group once the leader has exited.
    """

    def __init__(self, cmd: Sequence[str], *, name: str | None = None, cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None, log: Path | None = None, stderr: Path | None = None,
                 on_line: Callable[[str], None] | None = None, lifeline: bool = False,
                 pipe_output: bool = True, tail_lines: int = 200) -> None:
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self._cwd, self._env, self._log, self._stderr = cwd, env, log, stderr
        self._on_line, self._use_lifeline = on_line, lifeline
        self._pipe = pipe_output
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=tail_lines)
        self._seen = 0
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._lifeline: Lifeline | None = None
        self._reader: threading.Thread | None = None
        self.pgid: int | None = None
        self._ended = False

    # ------------------------------------------------------------------ start
    def start(self) -> ChildProcess:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        for path in (self._log, self._stderr):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.parent.mkdir(parents=True, exist_ok=True)
        err_fh = open(self._stderr, "ab") if self._stderr is not None else None  # noqa: SIM115
        out = subprocess.PIPE if self._pipe else None
        err = err_fh if err_fh is not None else subprocess.STDOUT if self._pipe else None
        try:
            self._lifeline = Lifeline() if self._use_lifeline else None
            group = {"process_group": self._lifeline.pgid} if self._lifeline else {"start_new_session": True}
            self._proc = subprocess.Popen(
                self.cmd, cwd=self._cwd, env=dict(self._env) if self._env is not None else None,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, errors="replace", **group)
        except BaseException:
            if self._lifeline is not None:
                self._lifeline.close()
                self._lifeline = None
            raise
        finally:
            if err_fh is not None:
                err_fh.close()
        self.pgid = self._lifeline.pgid if self._lifeline else self._proc.pid
        if self._pipe:
            self._reader = threading.Thread(target=self._pump, name=f"{self.name}-output", daemon=True)
            self._reader.start()
        return self

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log_fh = None
        if self._log is not None:
            try:
                log_fh = open(self._log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            except OSError as exc:
                LOGGER.warning("cannot open the log file %s of %s: %s", self._log, self.name, exc)
        try:
            for raw in self._proc.stdout:
                line = raw.rstrip("\r\n")
                if log_fh is not None:
                    log_fh.write(line + "\n")
                if self._on_line is not None:
                    self._on_line(line)
                with self._cond:
                    self._seen += 1
                    self._lines.append((self._seen, line))
                    self._cond.notify_all()
        except (OSError, ValueError):  # the pipe closed under us
            pass
        finally:
            if log_fh is not None:
                log_fh.close()
            with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} has not been started"
        return self._proc.pid

    @property
    def lifeline(self) -> Lifeline | None:
        return self._lifeline

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def poll(self) -> int | None:
        return self.returncode

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def tail(self, n: int = 40) -> list[str]:
        """The last ``n`` lines of output read so far."""
        with self._cond:
            return [line for _, line in list(self._lines)[-n:]]

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once the child has exited (``subprocess.TimeoutExpired`` after ``timeout``)."""
        assert self._proc is not None, f"{self.name} has not been started"
        return self._proc.wait(timeout)

    # ------------------------------------------------------------------ ready
    def wait_ready(self, ready: str | re.Pattern[str] | Callable[[], bool], timeout: float) -> str | None:
        """Wait until a line of output contains ``ready`` (a substring or a pattern; returns the line)
        or the predicate ``ready()`` is true (returns None). Raises :class:`ChildNotReady` when the
        child exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            code = self.returncode
            if code is not None:
                self.drain_output()  # the lines it printed before it exited count too
            if callable(ready):
                if ready():
                    return None
            else:
                with self._cond:
                    fresh = [(seq, line) for seq, line in self._lines if seq > checked]
                for seq, line in fresh:
                    checked = seq
                    if ready.search(line) if isinstance(ready, re.Pattern) else ready in line:
                        return line
            if code is not None:
                raise ChildNotReady(self._failure(f"{self.name} exited with code {code} before it was ready"),
                                    code)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildNotReady(self._failure(f"{self.name} was not ready within {timeout:g} s"), None)
            with self._cond:
                if self._seen <= checked or callable(ready):
                    self._cond.wait(min(left, 0.1))

    def drain_output(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) until the output of an exited child has all been read."""
        if self._reader is not None:
            self._reader.join(timeout)

    def _failure(self, headline: str) -> str:
        tail = self.tail(40)
        where = f" (full log: {self._stderr or self._log})" if (self._stderr or self._log) else ""
        return f"{headline}{where}; last output:\n" + "\n".join(tail) if tail else headline + where

    # ------------------------------------------------------------------ stop
    def signal(self, sig: int) -> None:
        """Send ``sig`` to the leader alone (a crash is simulated with ``signal(SIGKILL)``)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                assert self._proc is not None
                self._proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        if self.pgid is not None and not self._ended:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the group, or the leader), SIGKILL the group after ``grace_s``; kill what is left
        of the group; return the exit code. Idempotent; None when never started."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            if self._lifeline is not None:
                self.signal(signals.SIGTERM)
            else:
                self.signal_group(signals.SIGTERM)
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                LOGGER.warning("%s did not exit within %g s of SIGTERM: SIGKILL to its process group",
                               self.name, grace_s)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the whole group now and reap the leader; return its exit code. Idempotent."""
        if self._proc is None or self._ended:
            return self.returncode
        if self._lifeline is not None:
            self._lifeline.close()  # the watchdog's group: the leader and everything it started
        else:
            self.signal_group(signals.SIGKILL)
        code = self._proc.wait()
        self._ended = True  # the group id may be reused from now on: signal it no more
        self.drain_output()
        return code

    def __enter__(self) -> ChildProcess:
        return self if self._proc is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
