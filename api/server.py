"""The uvicorn server every long-running role (``serve``, ``worker``) runs its app in."""

from __future__ import annotations


def graceful_server(config):
    """A uvicorn server on which SIGINT/SIGTERM start a graceful shutdown that exits with status 0.

    (uvicorn's own handler re-raises the signal once shut down, so the process would die of it.)
    """
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server(config)
