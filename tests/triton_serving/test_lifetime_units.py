"""The lifetime pieces of triton_serving without Triton: the Lifeline process group with
real processes (it dies with its creator, SIGKILL included), and TritonSupervisor's restart logic
(backoff, counting, down time, stop) over a scripted stand-in for the server."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from diffserve.engine.processes import ChildProcess
from diffserve.triton_serving.distribution import TritonLaunchError
from diffserve.triton_serving.supervisor import TritonSupervisor

ROOT = Path(__file__).resolve().parents[2]

# A parent that puts a child and a grandchild into a Lifeline group, prints their pids, then waits.
PARENT = """\
import re, time
from diffserve.engine.processes import ChildProcess
child = ChildProcess(["sh", "-c", "sleep 120 & echo $!; wait"], lifeline=True).start()
grandchild = int(child.wait_ready(re.compile(r"^[0-9]+$"), 30))
print(child.pgid, child.pid, grandchild, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_lifeline_group_dies_with_its_creator(sig):
    parent = ChildProcess([sys.executable, "-c", PARENT], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    with parent:
        pgid, child, grandchild = map(int, parent.wait_ready(re.compile(r"^[0-9]+ [0-9]+ [0-9]+$"), 30).split())
        members = [pgid, child, grandchild]
        assert all(_alive(p) for p in members)
        parent.signal(sig)
        parent.wait(10)
        assert _wait_gone(members) == [], "members of the lifeline group outlived their creator"


def test_lifeline_close_kills_the_group_and_reaps_the_watchdog():
    sleeper = ChildProcess(["sleep", "120"], lifeline=True).start()
    lifeline = sleeper.lifeline
    assert lifeline is not None
    assert set(lifeline.alive_members()) == {lifeline.pgid, sleeper.pid}
    lifeline.close()
    assert sleeper.wait(5) == -signal.SIGKILL
    assert not _alive(lifeline.pgid)
    lifeline.close()  # idempotent
    assert sleeper.kill() == -signal.SIGKILL


class ScriptedServer:
    """Stands in for TritonServer: dies when told, and fails the next ``fail_starts`` starts."""

    def __init__(self, fail_starts: int = 0):
        self.alive = False
        self.fail_starts = fail_starts
        self.starts: list[float] = []
        self.stops = 0
        self.pid = 4242
        self.returncode = None

    def start(self, abort: threading.Event | None = None) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) > 1 and self.fail_starts > 0:
            self.fail_starts -= 1
            raise TritonLaunchError("Triton exited during start-up with code 1.\nErrors reported by the server:\n"
                                    "  E0101 failed to bind port\nLast 1 log lines:\nx")
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def stop(self, timeout: float | None = None) -> int:
        self.stops += 1
        self.alive = False
        return 0

    def log_tail(self) -> list[str]:
        return ["last line"]


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_supervisor_restarts_a_dead_server_and_counts_it():
    server = ScriptedServer()
    counted = []
    supervisor = TritonSupervisor(server, backoff_s=0.05, max_backoff_s=1.0, poll_s=0.01,
                                  on_restart=lambda: counted.append(1))
    supervisor.start()
    try:
        assert supervisor.down_for() is None and supervisor.restarts == 0
        server.alive = False  # the process died
        _until(lambda: len(server.starts) == 2 and supervisor.down_for() is None)
        assert supervisor.restarts == 1 and counted == [1] and supervisor.last_error is None
        assert server.starts[1] - server.starts[0] >= 0.05
    finally:
        supervisor.stop()
    assert not server.alive


def test_supervisor_backs_off_doubling_and_reports_down_time():
    server = ScriptedServer(fail_starts=3)
    supervisor = TritonSupervisor(server, backoff_s=0.05, max_backoff_s=0.15, poll_s=0.01)
    supervisor.start()
    try:
        died = time.monotonic()
        server.alive = False
        _until(lambda: supervisor.restarts >= 1 and supervisor.last_error is not None)
        assert supervisor.down_for() is not None and supervisor.down_for() > 0
        assert supervisor.last_error == "Triton exited during start-up with code 1. E0101 failed to bind port"
        _until(lambda: server.alive)
        assert supervisor.restarts == 4 and supervisor.down_for() is None and supervisor.last_error is None
        gaps = [b - a for a, b in zip([died] + server.starts[1:], server.starts[1:])]
        # waits 0.05, 0.10, then capped at 0.15 twice
        for gap, expected in zip(gaps, [0.05, 0.10, 0.15, 0.15]):
            assert gap >= expected * 0.9, (gaps, expected)
    finally:
        supervisor.stop()


def test_supervisor_stop_ends_a_pending_restart():
    # A ten-minute backoff: a restart is pending for the whole test, and a stop() that waited it
    # out (or performed it) would leave the watch thread alive and the server started again.
    server = ScriptedServer()
    supervisor = TritonSupervisor(server, backoff_s=600, max_backoff_s=600, poll_s=0.01)
    supervisor.start()
    _until(lambda: server.alive)
    server.alive = False
    _until(lambda: server.stops >= 1)  # found dead and reaped: now waiting to restart
    assert supervisor.down_for() is not None
    stopper = threading.Thread(target=supervisor.stop)
    stopper.start()
    stopper.join(30)  # bounds a hang only; the pending restart is 600 s away
    assert not stopper.is_alive() and not supervisor._thread.is_alive()
    assert supervisor.restarts == 0 and len(server.starts) == 1  # the pending restart was never performed
    assert supervisor.down_for() is None  # a stopping supervisor is not "down"


def test_supervisor_rejects_bad_backoff():
    with pytest.raises(ValueError):
        TritonSupervisor(ScriptedServer(), backoff_s=0)
    with pytest.raises(ValueError):
        TritonSupervisor(ScriptedServer(), backoff_s=5, max_backoff_s=1)
