"""The uvicorn server every long-running role (``serve``, ``worker``) runs its app in."""

from __future__ import annotations

from collections.abc import Callable


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


def run_until_stopped(app, settings, *, access_log: bool, ready_line: Callable[[str], str]) -> int:
    """Serve ``app`` on ``settings.host``/``port`` until SIGINT/SIGTERM; print ``ready_line(url)`` once it
    listens (the line ``diffserve demo`` and the tests wait for). 0 after a graceful stop, 1 if it never started."""
    import asyncio

    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=30, access_log=access_log)
    server = graceful_server(config)

    async def serve() -> bool:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(ready_line(f"http://{'[' + host + ']' if ':' in host else host}:{port}"), flush=True)
        await task
        return server.started

    return 0 if asyncio.run(serve()) else 1
