"""Finding a Triton server's processes through /proc: by parentage and process group, never by
name across the machine (other tests may run their own Triton)."""

from __future__ import annotations

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
