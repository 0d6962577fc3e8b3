"""``diffserve serve`` as a real process on loopback, for tests that kill and restart servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``python -m api.cli serve ARGS`` with ``env`` added to the environment; ``url`` is the
    address it printed once ready. Its log (stderr) goes to ``log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", "0", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True,
                                     env=dict(os.environ, **env))
        ready = next((line for line in self.proc.stdout if "ready at" in line), None)
        if ready is None:
            raise AssertionError(f"serve {args} exited ({self.proc.wait()}):\n{log.read_text()[-3000:]}")
        self.url = ready.split("ready at", 1)[1].split()[0]
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # never block on a full pipe

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or an OOM kill leaves behind)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
