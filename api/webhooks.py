"""Webhooks: a ``/v2`` request's result POSTed to the client's URL once it is COMPLETED or FAILED.

This module owns the feature; two hooks use it: ``diffserve.api.routes.models`` records a delivery when it
accepts a request, ``diffserve.api.app`` runs the :class:`WebhookDeliverer` for the app's lifetime (in every
process that has the store and webhook secrets, so on Redis any API replica, or a worker given
the secrets, may make an attempt).

* **Signing** per Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id``
  (``msg_<request id>``: the same on every retry, so a receiver can drop duplicates),
  ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``
  (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``), keyed by the API key's ``whsec_``
  secret (``Settings.webhook_secret``, or read from ``Settings.webhook_secret_file``).
* **Retries** (:class:`RetrySchedule`): after a non-2xx answer, a connection error or a timeout,
  the next attempt follows the configured schedule (Standard Webhooks': 5 s, 5 min, 30 min, 2 h,
  5 h, 10 h, 10 h), each wait jittered; after the last the delivery is dropped and logged.
* **The outbox** (:class:`WebhookOutbox`) holds every pending delivery from the moment its
  request is accepted until it succeeded or ran out of retries, so a crash or a restart loses
  none: :class:`SqliteWebhookOutbox` (its own file beside the job database) and
  :class:`RedisWebhookOutbox` (a sorted set by next-attempt time and a hash per delivery). A
  claim moves the delivery's next-attempt time one lease ahead, so only one process makes an
  attempt; a process that dies mid-attempt leaves the lease to lapse and another attempt
  follows. Delivery is therefore at least once. One gap remains: the delivery is recorded just after
  its job is created (the job id is drawn by the store), so a crash between the two loses it.
* **The result body** is frozen at the first attempt (the same JSON as ``GET
  /v2/requests/{id}``): the job may have expired before the last retry.
* **SSRF**: the URL goes through the guard of image URLs (``diffserve.api.images.vet_url``) when the
  request is accepted (a 400) and again before every attempt, and the connection goes to the
  vetted address; redirects are not followed (a 3xx is a failed attempt).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from diffserve.api.images import ImageFetchPolicy, ImageInputError, send_pinned, vet_url
from diffserve.api.jobs import Job
from diffserve.api.metrics import ApiMetrics
from diffserve.api.redis_client import StoreUnavailable, guarded, lua

__all__ = [
    "Delivery", "RedisWebhookOutbox", "RetrySchedule", "SqliteWebhookOutbox", "WebhookDeliverer",
    "WebhookError", "WebhookOptions", "WebhookOutbox", "decode_secret", "generate_secret", "requested_webhook",
    "sign", "signed_headers",
]

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
FIELD = "webhook"
"""The ``/v2`` body field naming the URL (taken out of the body before the model's parameters
are validated)."""
USER_AGENT = "diffserve-webhook/1"


class WebhookError(ValueError):
    """A webhook a request names cannot be accepted; the message is client-facing (a 400)."""


# -- signing (Standard Webhooks) -----------------------------------------------------------------


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError naming what is wrong (never the secret)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} followed by base64 (see `diffserve` README)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} followed by base64; this one is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret must hold 24 to 64 bytes (Standard Webhooks); this one has {len(key)}")
    return key


def generate_secret() -> str:
    """A new ``whsec_`` secret of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">``: the ``webhook-signature`` value."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def message_id(job_id: str) -> str:
    return f"msg_{job_id}"


# -- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySchedule:
    """Waits before each retry; ``next_delay(n)`` is the wait once ``n`` attempts have failed."""

    delays_s: tuple[float, ...]
    jitter: float = 0.0
    """Each wait is drawn uniformly from ``delay * (1 - jitter) .. delay * (1 + jitter)``."""

    def __post_init__(self) -> None:
        if any(d <= 0 for d in self.delays_s):
            raise ValueError(f"webhook retry waits must be positive, got {list(self.delays_s)}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"webhook retry jitter must be in [0, 1), got {self.jitter}")

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s) + 1

    def next_delay(self, failed_attempts: int, rng: random.Random | None = None) -> float | None:
        """Seconds until the next attempt after ``failed_attempts`` (>= 1) failed; None: give up."""
        if failed_attempts < 1:
            raise ValueError("next_delay is asked after a failed attempt")
        if failed_attempts > len(self.delays_s):
            return None
        delay = self.delays_s[failed_attempts - 1]
        return delay * (1.0 + (rng or random).uniform(-self.jitter, self.jitter))


def _check_url_syntax(url: str, what: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{what}: invalid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{what}: must be an http(s) URL with a host")


@dataclass(frozen=True)
class WebhookOptions:
    """What the intake and the deliverer need, read from ``Settings`` once (owners, not keys)."""

    schedule: RetrySchedule
    timeout_s: float = 15.0
    poll_s: float = 1.0
    policy: ImageFetchPolicy = field(default_factory=ImageFetchPolicy)
    """The SSRF policy (its ``allow_networks`` are ``webhook_allow_networks``)."""
    default_secret: bytes | None = field(default=None, repr=False)
    secrets_by_owner: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    default_url: str | None = None
    urls_by_owner: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> WebhookOptions:
        default_secret, secrets = settings.per_owner(settings.webhook_secret)
        default_url, urls = settings.per_owner(settings.webhook_url)
        for url in [default_url, *urls.values()]:
            if url is not None:
                _check_url_syntax(url, "webhook_url")
        return cls(
            schedule=RetrySchedule(tuple(settings.webhook_retry_schedule_s), settings.webhook_retry_jitter),
            timeout_s=settings.webhook_timeout_s, poll_s=settings.webhook_poll_s,
            policy=ImageFetchPolicy(timeout_s=settings.webhook_timeout_s,
                                    allow_networks=tuple(settings.webhook_allow_networks)),
            default_secret=None if default_secret is None else decode_secret(default_secret),
            secrets_by_owner={owner: decode_secret(s) for owner, s in secrets.items()},
            default_url=default_url, urls_by_owner=urls,
        )

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery is withheld from other processes: an attempt (at most
        ``timeout_s``) and the store writes around it."""
        return 2 * self.timeout_s + 5.0

    @property
    def enabled(self) -> bool:
        """Whether any key has a secret: only then are webhooks accepted and delivered here (a
        worker configured without secrets must not claim, and drop, the API replicas' deliveries)."""
        return self.default_secret is not None or bool(self.secrets_by_owner)

    def secret_for(self, owner: str | None) -> bytes | None:
        if owner is not None and owner in self.secrets_by_owner:
            return self.secrets_by_owner[owner]
        return self.default_secret

    def url_for(self, owner: str | None) -> str | None:
        if owner is not None and owner in self.urls_by_owner:
            return self.urls_by_owner[owner]
        return self.default_url


async def requested_webhook(payload: dict, owner: str | None, options: WebhookOptions) -> str | None:
    """Take ``webhook`` out of a ``/v2`` body (else the owner's default URL) and vet it: the URL
    to record, or None. Raises WebhookError (a 400) for a bad URL or a key without a secret."""
    url = payload.pop(FIELD, None)
    if url is None:
        url = options.url_for(owner)
        if url is None:
            return None
    if not isinstance(url, str) or not url:
        raise WebhookError(f"{FIELD}: must be an http(s) URL string")
    if options.secret_for(owner) is None:
        raise WebhookError(f"{FIELD}: this API key has no webhook secret configured (DIFFSERVE_WEBHOOK_SECRET); "
                           "deliveries are always signed")
    try:
        await asyncio.wait_for(vet_url(url, FIELD, options.policy), options.timeout_s)
    except ImageInputError as exc:
        raise WebhookError(str(exc)) from None
    except asyncio.TimeoutError:
        raise WebhookError(f"{FIELD}: timed out resolving the host of {url[:200]!r}") from None
    return url


# -- the outbox ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One pending webhook delivery (one per request)."""

    job_id: str
    url: str
    owner: str | None
    base: str
    """Base of the absolute output URLs in the result body (the one the client submitted to)."""
    next_at: float = 0.0
    """Unix time of the next attempt (while claimed: when the claim's lease ends)."""
    attempts: int = 0
    """Failed attempts so far."""
    payload: bytes | None = None
    """The result body, frozen at the first attempt."""
    last_error: str | None = None


@runtime_checkable
class WebhookOutbox(Protocol):
    """Durable pending deliveries, ordered by next-attempt time."""

    def add(self, delivery: Delivery) -> None:
        """Record a new delivery (due at ``delivery.next_at``); a no-op while one for its job is recorded."""

    def claim_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries due at ``now``, withheld from other claims for ``lease_s``."""

    def save(self, delivery: Delivery) -> None:
        """Write back attempts, next-attempt time, payload and last error."""

    def remove(self, job_id: str) -> None:
        """Forget a delivery (delivered, or given up)."""

    def get(self, job_id: str) -> Delivery | None: ...

    def pending(self) -> int: ...

    def close(self) -> None: ...


_COLUMNS = ("job_id", "url", "owner", "base", "next_at", "attempts", "payload", "last_error")


class SqliteWebhookOutbox:
    """The outbox of the embedded store: one SQLite table in its own file, fsynced on every write."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
            job_id TEXT PRIMARY KEY, url TEXT NOT NULL, owner TEXT, base TEXT NOT NULL,
            next_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, payload BLOB, last_error TEXT)""")
        self._db.execute("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at)")

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR IGNORE INTO deliveries ({', '.join(_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                             [getattr(delivery, c) for c in _COLUMNS])

    def claim_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM deliveries WHERE next_at <= ? "
                                        "ORDER BY next_at LIMIT ?", (now, limit)).fetchall()
                self._db.executemany("UPDATE deliveries SET next_at = ? WHERE job_id = ?",
                                     [(now + lease_s, row[0]) for row in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Delivery(*row) for row in rows]

    def save(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute("UPDATE deliveries SET next_at = ?, attempts = ?, payload = ?, last_error = ? "
                             "WHERE job_id = ?", (delivery.next_at, delivery.attempts, delivery.payload,
                                                  delivery.last_error, delivery.job_id))

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))

    def get(self, job_id: str) -> Delivery | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM deliveries WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else Delivery(*row)

    def pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisWebhookOutbox:
    """The outbox on the shared Redis: ``<ns>:webhooks:due`` (job ids scored by next-attempt time)
    and ``<ns>:webhook:<job id>`` (the delivery's fields). ``webhooks_claim.lua`` takes the due
    ids and moves their score one lease ahead in one step, so two replicas never claim one
    attempt. The hashes carry no TTL: a delivery lives until it is delivered or given up."""

    def __init__(self, client: Any, namespace: str):
        self._redis = client
        self._due = f"{namespace}:webhooks:due"
        self._prefix = f"{namespace}:webhook:"
        self._claim = client.register_script(lua("webhooks_claim"))
        self._add = client.register_script(lua("webhooks_add"))

    def _fields(self, delivery: Delivery) -> dict[str, Any]:
        values = {c: getattr(delivery, c) for c in _COLUMNS}
        return {k: v for k, v in values.items() if v is not None}

    def _delivery(self, raw: dict[bytes, bytes]) -> Delivery | None:
        if not raw:
            return None
        text = {k.decode(): v for k, v in raw.items()}

        def string(name: str) -> str | None:
            return text[name].decode() if name in text else None

        return Delivery(job_id=string("job_id"), url=string("url"), owner=string("owner"), base=string("base"),
                        next_at=float(text["next_at"]), attempts=int(text.get("attempts", b"0")),
                        payload=text.get("payload"), last_error=string("last_error"))

    @guarded("the webhook outbox")
    def add(self, delivery: Delivery) -> None:
        pairs = [item for field_value in self._fields(delivery).items() for item in field_value]
        self._add(keys=[self._prefix + delivery.job_id, self._due],
                  args=[delivery.job_id, repr(float(delivery.next_at)), *pairs])

    @guarded("the webhook outbox")
    def claim_due(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        ids = self._claim(keys=[self._due], args=[repr(now), repr(now + lease_s), limit])
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._prefix + job_id.decode())
        claimed = [self._delivery(raw) for raw in pipe.execute()]
        return [d for d in claimed if d is not None]

    @guarded("the webhook outbox")
    def save(self, delivery: Delivery) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._prefix + delivery.job_id, mapping=self._fields(delivery))
        if delivery.last_error is None:
            pipe.hdel(self._prefix + delivery.job_id, "last_error")
        pipe.zadd(self._due, {delivery.job_id: delivery.next_at})
        pipe.execute()

    @guarded("the webhook outbox")
    def remove(self, job_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self._due, job_id)
        pipe.delete(self._prefix + job_id)
        pipe.execute()

    @guarded("the webhook outbox")
    def get(self, job_id: str) -> Delivery | None:
        return self._delivery(self._redis.hgetall(self._prefix + job_id))

    @guarded("the webhook outbox")
    def pending(self) -> int:
        return int(self._redis.zcard(self._due))

    def close(self) -> None:
        pass  # the client is the job store's; it closes it


# -- the deliverer -------------------------------------------------------------------------------


class WebhookDeliverer:
    """The loop that makes due attempts: claim, wait for the job to finish, sign, POST, settle.

    ``render(job, base)`` is the result body of a finished job (``GET /v2/requests/{id}``'s JSON).
    """

    def __init__(self, outbox: WebhookOutbox, store: Any, options: WebhookOptions,
                 render: Callable[[Job, str], bytes], *, metrics: ApiMetrics | None = None, batch: int = 32,
                 clock: Callable[[], float] = time.time):
        self.outbox = outbox
        self.metrics = metrics
        self.store = store
        self.options = options
        self.render = render
        self.batch = batch
        self.clock = clock
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the loop, in a process configured with webhook secrets (else there is nothing it may sign)."""
        if self.options.enabled:
            self._task = asyncio.create_task(self._loop(), name="webhook-deliverer")

    @property
    def running(self) -> bool:
        return self._task is not None

    async def stop(self) -> None:
        """Stop; an attempt cut short keeps its lease and is made again once the lease lapses."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        # trust_env=False: a proxy from the environment would connect on its own, past the guard.
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
            while True:
                claimed = 0
                try:
                    claimed = await self.deliver_due(client)
                except StoreUnavailable as exc:
                    logger.warning("webhook deliveries wait for the store: %s", exc)
                except Exception:  # noqa: BLE001 - the loop must outlive any one bad delivery
                    logger.exception("webhook delivery round failed")
                if claimed < self.batch:
                    await asyncio.sleep(self.options.poll_s)

    async def deliver_due(self, client: httpx.AsyncClient) -> int:
        """Claim the due deliveries and make their attempts; returns how many were claimed."""
        due = await asyncio.to_thread(self.outbox.claim_due, self.clock(), self.options.lease_s, self.batch)
        outcomes = await asyncio.gather(*(self._attempt(client, delivery) for delivery in due), return_exceptions=True)
        for delivery, outcome in zip(due, outcomes, strict=True):
            if isinstance(outcome, Exception):
                # Its lease lapses and another attempt follows (at least once).
                logger.warning("request %s: webhook attempt not settled: %s", delivery.job_id, outcome)
        return len(due)

    async def _attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        if delivery.payload is None:
            job = await asyncio.to_thread(self.store.get, delivery.job_id)
            if job is None:
                logger.warning("request %s: webhook dropped: the request expired before it finished", delivery.job_id)
                await self._settle(delivery, "dropped")
                return
            if not job.status.terminal:
                delivery.next_at = self.clock() + self.options.poll_s
                await asyncio.to_thread(self.outbox.save, delivery)
                return
            delivery.payload = await asyncio.to_thread(self.render, job, delivery.base)
        key = self.options.secret_for(delivery.owner)
        if key is None:
            logger.error("request %s: webhook dropped: its API key has no webhook secret any more", delivery.job_id)
            await self._settle(delivery, "dropped")
            return
        error = await self._post(client, delivery, key)
        if error is None:
            logger.info("request %s: webhook delivered to %s (attempt %d)", delivery.job_id, _short(delivery.url),
                        delivery.attempts + 1)
            await self._settle(delivery, "delivered")
            return
        delivery.attempts += 1
        delivery.last_error = error
        delay = self.options.schedule.next_delay(delivery.attempts)
        if delay is None:
            logger.error("request %s: webhook to %s given up after %d attempts; last: %s", delivery.job_id,
                         _short(delivery.url), delivery.attempts, error)
            await self._settle(delivery, "given_up")
            return
        delivery.next_at = self.clock() + delay
        logger.warning("request %s: webhook attempt %d to %s failed (%s); next in %.0f s", delivery.job_id,
                       delivery.attempts, _short(delivery.url), error, delay)
        await asyncio.to_thread(self.outbox.save, delivery)
        self._count("retry")

    async def _settle(self, delivery: Delivery, outcome: str) -> None:
        """The delivery is done with (delivered, given up or dropped): out of the outbox."""
        await asyncio.to_thread(self.outbox.remove, delivery.job_id)
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhook_attempts.labels(outcome).inc()

    async def _post(self, client: httpx.AsyncClient, delivery: Delivery, key: bytes) -> str | None:
        """One signed POST; None when the receiver answered 2xx, else why the attempt failed."""
        assert delivery.payload is not None
        headers = signed_headers(key, message_id(delivery.job_id), int(self.clock()), delivery.payload)
        try:
            return await asyncio.wait_for(self._send(client, delivery, headers), self.options.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return f"timed out after {self.options.timeout_s:g} s"
        except ImageInputError as exc:  # refused by the guard, unresolvable, or no connection
            return str(exc)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _send(self, client: httpx.AsyncClient, delivery: Delivery, headers: dict[str, str]) -> str | None:
        url, addresses = await vet_url(delivery.url, FIELD, self.options.policy)
        response = await send_pinned(client, "POST", url, addresses, FIELD, headers=headers,
                                     timeout_s=self.options.timeout_s, content=delivery.payload)
        try:
            return None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        finally:
            await response.aclose()


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."
