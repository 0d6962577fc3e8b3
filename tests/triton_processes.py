"""Finding a Triton server's processes through /proc: by parentage and process group, never by
name across the machine (other tests may run their own Triton)."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(command name, state, parent pid, process group) from /proc, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    state, ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
    return comm, state, int(ppid), int(pgrp)


def all_processes() -> dict[int, tuple[str, str, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := proc_stat(int(entry.name))) is not None and info[1] not in ("Z", "X"):
            found[int(entry.name)] = info
    return found


def descendants(root: int) -> dict[int, tuple[str, str, int, int]]:
    procs = all_processes()
    children: dict[int, list[int]] = {}
    for pid, (_, _, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = procs[pid]
        todo += children.get(pid, [])
    return found


def triton_of(serve_pid: int) -> tuple[int, list[int]]:
    """(tritonserver pid, its python-backend stub pids) under a serve process."""
    tree = descendants(serve_pid)
    [server] = [pid for pid, info in tree.items() if info[0] == "tritonserver"]
    stubs = [pid for pid, info in tree.items() if info[0].startswith("triton_python")]  # comm is cut at 15
    return server, stubs




def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stubs_of_model(server: int, model: str) -> list[int]:
    """The python-backend stub processes of one model of the Triton server ``server``.

    A stub's first argument is its model's ``<repository>/<model>/<version>/model.py``.
    """
    found = []
    for pid, info in descendants(server).items():
        if info[0].startswith("triton_python"):
            args = _cmdline(pid)
            if len(args) > 1 and Path(args[1]).parts[-3:-2] == (model,):
                found.append(pid)
    return found


@contextmanager
def frozen(pids: list[int]):
    """SIGSTOP the processes for the block, SIGCONT them after (also when the block fails)."""
    assert pids, "no process to freeze"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
