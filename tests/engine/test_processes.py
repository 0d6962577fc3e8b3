"""ChildProcess with real tiny children: ready by a line, a timeout, a child that dies first, a stop
that reaches grandchildren, grace then SIGKILL for a child that ignores SIGTERM, idempotent stop."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest

from diffserve.engine.processes import ChildNotReady, ChildProcess


def py(code: str, **kwargs) -> ChildProcess:
    return ChildProcess([sys.executable, "-u", "-c", code], name="child", **kwargs)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_ready_by_line_returns_the_line_and_keeps_reading(tmp_path):
    log = tmp_path / "child.log"
    code = "import time\nprint('starting')\nprint('ready at http://x:1')\nfor i in range(3): print(i)\ntime.sleep(60)"
    with py(code, log=log) as child:
        assert child.wait_ready("ready at", 10) == "ready at http://x:1"
        assert child.wait_ready(re.compile(r"^2$"), 10) == "2"
        assert child.alive()
    assert child.returncode == -signal.SIGTERM
    assert log.read_text().splitlines() == ["starting", "ready at http://x:1", "0", "1", "2"]


def test_ready_by_predicate_and_stderr_to_a_file(tmp_path):
    marker, err = tmp_path / "up", tmp_path / "err.log"
    child = py(f"import sys, time, pathlib\nprint('oops', file=sys.stderr)\npathlib.Path({str(marker)!r}).touch()\n"
               "time.sleep(60)", stderr=err).start()
    try:
        assert child.wait_ready(marker.exists, 10) is None
    finally:
        child.stop(5)
    assert err.read_text() == "oops\n" and child.tail() == []


def test_ready_timeout_names_the_wait_and_the_output():
    child = py("import time\nprint('still loading')\ntime.sleep(60)").start()
    try:
        with pytest.raises(ChildNotReady, match="not ready within 0.5 s") as info:
            child.wait_ready("ready at", 0.5)
        assert "still loading" in str(info.value) and info.value.returncode is None
        assert child.alive()
    finally:
        child.stop(5)


def test_child_dying_early_raises_with_its_exit_code_and_last_lines():
    child = py("import sys\nprint('bad config')\nsys.exit(3)").start()
    started = time.monotonic()
    with pytest.raises(ChildNotReady, match="exited with code 3") as info:
        child.wait_ready("ready at", 30)
    assert time.monotonic() - started < 10
    assert info.value.returncode == 3 and "bad config" in str(info.value)
    assert child.stop() == 3


def test_stop_kills_grandchildren_in_the_group():
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            "print('grandchild', p.pid)\ntime.sleep(60)")
    child = py(code).start()
    grandchild = int(child.wait_ready("grandchild", 10).split()[1])
    assert os.getpgid(grandchild) == child.pgid == child.pid
    assert child.stop(5) == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the grandchild outlived the stop of its group"


def test_grace_then_kill_for_a_child_ignoring_sigterm():
    child = py("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up')\ntime.sleep(60)")
    child.start().wait_ready("up", 10)
    started = time.monotonic()
    assert child.stop(0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 10


def test_stop_is_idempotent_and_kill_and_signal_are_safe_afterwards():
    child = py("import time\nprint('up')\ntime.sleep(60)")
    assert child.stop() is None  # never started
    child.start().wait_ready("up", 10)
    assert child.stop(5) == -signal.SIGTERM
    assert child.stop(5) == -signal.SIGTERM
    assert child.kill() == -signal.SIGTERM
    child.signal(signal.SIGKILL)
    assert not child.alive()


def test_signal_reaches_the_leader_alone_and_kill_the_group():
    child = py("import time\nprint('up')\ntime.sleep(60)").start()
    child.wait_ready("up", 10)
    child.signal(signal.SIGKILL)  # a crash
    assert child.wait(10) == -signal.SIGKILL
    assert child.kill() == -signal.SIGKILL


def test_lifeline_child_dies_with_the_group():
    child = py("import time\nprint('up')\ntime.sleep(60)", lifeline=True).start()
    child.wait_ready("up", 10)
    assert child.lifeline is not None and child.pgid == child.lifeline.pgid != child.pid
    assert child.pid in child.lifeline.alive_members()
    assert child.stop(5) == -signal.SIGTERM
    assert not alive(child.pgid), "the lifeline's watchdog is reaped with the group"


def test_a_command_that_cannot_run_raises_and_leaves_no_lifeline(tmp_path):
    child = ChildProcess([str(tmp_path / "missing")], lifeline=True)
    with pytest.raises(OSError):
        child.start()
    assert child.lifeline is None and child.stop() is None
