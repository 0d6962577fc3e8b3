"""``diffserve`` sub-commands as real processes on loopback, for tests that kill and restart servers."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from diffserve.engine.processes import ChildNotReady, ChildProcess

REPO = Path(__file__).resolve().parents[2]


def start_cli(args: list[str], log: Path, *, env: dict[str, str] | None = None, ready: str = "ready at",
              url_after: str = "ready at", timeout_s: float = 600.0) -> tuple[ChildProcess, str]:
    """``python -m diffserve.api.cli ARGS`` with ``env`` added to the environment, its stderr appended to ``log``;
    returns the process and the URL its stdout printed after ``url_after`` on the line with ``ready``."""
    child = ChildProcess([sys.executable, "-m", "diffserve.api.cli", *args], name=f"diffserve {args[0]}", cwd=REPO,
                         env=dict(os.environ, **(env or {})), stderr=log).start()
    try:
        line = child.wait_ready(ready, timeout_s)
    except ChildNotReady as exc:
        child.kill()
        raise AssertionError(f"{args} did not start ({exc}):\n{log.read_text()[-3000:]}") from None
    assert line is not None
    return child, line.split(url_after, 1)[1].split()[0].removesuffix("/readyz")


class ServeProcess:
    """``python -m diffserve.api.cli serve ARGS`` with ``env`` added to the environment; ``url`` is the
    address it printed once ready. Its log (stderr) goes to ``log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.child, self.url = start_cli(["serve", "--port", "0", *args], log, env=env)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or an OOM kill leaves behind)."""
        self.child.signal(signal.SIGKILL)
        self.child.wait(30)

    def stop(self) -> None:
        self.child.stop(60)
