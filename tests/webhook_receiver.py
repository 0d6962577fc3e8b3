"""A webhook receiver for the tests: a real HTTP server on loopback, and the signature check a
receiver makes, written from the Standard Webhooks spec with ``hmac`` (not with diffserve.api.webhooks)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}" keyed by the base64-decoded
    secret, compared with each space-separated ``v1,`` entry of ``webhook-signature``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, part.partition(",")[2])
               for part in headers["webhook-signature"].split() if part.startswith("v1,"))


class Receiver:
    """Answers each POST with the next of ``statuses`` (then ``default``) and records every
    request as (lower-cased headers, body, status answered)."""

    def __init__(self, statuses: list[int] | None = None, default: int = 200):
        self.statuses = list(statuses or [])
        self.default = default
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._changed:
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                    receiver._changed.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout_s: float = 120.0) -> list[tuple[dict[str, str], bytes, int]]:
        """Block until ``predicate(received)`` holds; returns a copy of what was received."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                assert left > 0, f"the receiver did not get what was awaited; got {self.received}"
                self._changed.wait(left)
            return list(self.received)

    def delivered(self, webhook_id: str) -> list[tuple[dict[str, str], bytes, int]]:
        """Wait for a 2xx answer to ``webhook_id``; returns every attempt of it."""
        got = self.wait_for(lambda r: any(h["webhook-id"] == webhook_id and s < 300 for h, _, s in r))
        return [entry for entry in got if entry[0]["webhook-id"] == webhook_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
