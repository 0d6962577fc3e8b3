"""``create_app(settings, backend, role=...)``: the FastAPI application serving the Segmind contract.

Roles: ``all`` (today's single process: the routes and the job runner on ``backend``), ``api``
(a stateless replica on a shared Redis store: the routes, no jobs run here; ``backend`` is a
``QueueOnlyBackend``) and ``worker`` (only health and metrics routes; the runner takes the jobs
of ``backend``'s slugs from Redis). ``settings.redis_url`` chooses the store: None is the
embedded SQLite store of one process, a URL the Redis store, queue, credits and rate limits
shared by every replica and worker.

The app owns the job store, the job runner, credits and rate limits for its lifetime (built in
the lifespan, closed at shutdown, together with the backend it was given). Routes live in
``api/routes``; dependencies in ``api/deps``; wire schemas in ``api/schemas``. An outer ASGI
middleware enforces the body-size limit, records HTTP metrics and adds ``X-remaining-credits``
to every 200 an authenticated caller gets.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from collections.abc import Collection

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.backend import GenerationBackend
from api.deps import AppState
from api.errors import BodyTooLarge, error_response, install_error_handlers
from api.inputs import InputStore
from api.jobs import JobStore
from api.metrics import ApiMetrics, slug_label
from api.quotas import CreditLedger, RateLimiter
from api.routes import health, models, requests
from api.runner import JobRunner
from api.settings import Settings
from engine.catalog import CATALOG

logger = logging.getLogger(__name__)

DESCRIPTION = """Self-hosted serving of the Segmind image models with the same HTTP contract.

* `POST /v1/{slug}`: generate and return the image (or base64 JSON with `base64=true`).
* `POST /v2/{slug}`: queue; poll `GET /v2/requests/{id}/status`; fetch `GET /v2/requests/{id}`.
* Each served slug has its own pair of operations below, with that model's request schema.
* Auth: `x-api-key` header (or `Authorization: Bearer`). Errors: JSON `{"error": "..."}`;
  a FAILED request is served with HTTP 422.
"""


class RequestGuard:
    """Body-size limit, HTTP metrics and the credits header, as plain ASGI (no body buffering)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: ApiMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = 500
        limit = self.max_body_bytes

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 200 and "caller_owner" in state:
                    try:
                        remaining = scope["app"].state.diffserve.ledger.remaining(state["caller_owner"])
                    except Exception:  # noqa: BLE001 - Redis went away mid-request: leave the header out
                        logger.warning("credits header left out: the ledger is unavailable")
                    else:
                        MutableHeaders(scope=message)["X-remaining-credits"] = (
                            "unlimited" if remaining is None else str(remaining))
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                response = error_response(413, f"request body is {declared} bytes, over the limit of {limit} bytes",
                                          {"Connection": "close"})
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, limited_receive, send_with_headers)
        finally:
            route = scope.get("route")
            # Per-slug generation routes carry the label of their family (api.routes.models).
            endpoint = getattr(route, "metrics_path", None) or getattr(route, "path", None) or "unmatched"
            slug = (state.get("metrics_slug") or getattr(route, "metrics_slug", None)
                    or scope.get("path_params", {}).get("slug"))
            self.metrics.observe_http(endpoint, scope["method"], slug_label(slug), status,
                                      time.perf_counter() - start)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


ROLES = ("all", "api", "worker")


class QueueOnlyBackend:
    """The backend of an ``api`` replica: it queues every catalog slug and runs nothing (workers do)."""

    def __init__(self, slugs: Collection[str] = tuple(CATALOG)):
        self._slugs = tuple(slugs)

    @property
    def slugs(self) -> Collection[str]:
        return self._slugs

    async def generate(self, slug, params, *, request_id, on_progress=None):
        raise RuntimeError("an api replica runs no jobs")

    async def ready(self) -> dict[str, bool]:
        # Readiness of an api replica is its store's (the "redis" entry); models are the workers'.
        return {"server": True, **{slug: True for slug in self._slugs}}

    async def close(self) -> None:
        pass


def _unavailable_as(default, fn):
    """``fn`` for a metrics collector: while Redis is down the scrape shows ``default``, not a 500."""
    from api.redis_jobs import StoreUnavailable

    def read():
        try:
            return fn()
        except StoreUnavailable:
            return default
    return read


def _open_stores(settings: Settings):
    """(job store, inputs, credit ledger, rate limiter) on SQLite or, with ``redis_url``, on Redis."""
    default_credits, credits_by_owner = settings.per_owner(settings.credits)
    default_rate, rate_by_owner = settings.per_owner(settings.rate_limit_per_minute)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.redis_url is None:
        store = JobStore(settings.jobs_db_path, outputs_dir=settings.outputs_dir,
                         retention_s=settings.retention_s, max_attempts=settings.request_max_attempts)
        inputs = InputStore(settings.inputs_dir)
        ledger = CreditLedger(settings.data_dir / "credits.sqlite", default_credits, credits_by_owner)
        return store, inputs, ledger, RateLimiter(default_rate or 0, rate_by_owner)
    from api.redis_jobs import RedisJobStore, connect
    from api.redis_quotas import RedisCreditLedger, RedisRateLimiter

    client = connect(settings.redis_url)
    ns = settings.redis_namespace
    store = RedisJobStore(settings.redis_url, namespace=ns, retention_s=settings.retention_s,
                          max_attempts=settings.request_max_attempts, reclaim_idle_s=settings.reclaim_idle_s,
                          client=client)
    ledger = RedisCreditLedger(None, default_credits, credits_by_owner, namespace=ns, client=client)
    limiter = RedisRateLimiter(None, default_rate or 0, rate_by_owner, namespace=ns, client=client)
    try:
        persistence = store.persistence()
        if persistence and (persistence.get("appendonly") != "yes"
                            or persistence.get("maxmemory-policy") != "noeviction"):
            logger.warning("Redis persistence %s can lose accepted jobs; run it with appendonly yes, "
                           "appendfsync always, maxmemory-policy noeviction", persistence)
    except Exception as exc:  # noqa: BLE001 - Redis may be down at start; service resumes when it returns
        logger.warning("Redis at %s is not reachable yet: %s", store.address, exc)
    # InputStore is unused on Redis (inputs travel with the job); it stays for the runner's signature.
    return store, InputStore(settings.inputs_dir), ledger, limiter


def create_app(settings: Settings, backend: GenerationBackend, *, role: str = "all") -> FastAPI:
    """Build the app; it takes ownership of ``backend`` (closed at shutdown)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if role != "all" and settings.redis_url is None:
        raise ValueError(f"the {role} role needs a shared store: set DIFFSERVE_REDIS_URL (or --redis-url)")
    unknown = sorted(set(backend.slugs) - set(CATALOG))
    if unknown:
        raise ValueError(f"the backend serves slugs the catalog does not know: {', '.join(unknown)}")
    metrics = ApiMetrics()
    triton_restarts = getattr(backend, "triton_restarts", None)
    if triton_restarts is not None:  # a Triton server this process started and supervises
        metrics.watch_triton_restarts(triton_restarts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store, inputs, ledger, limiter = _open_stores(settings)
        _, models_by_owner = settings.per_owner(settings.key_models)
        metrics.watch_store(_unavailable_as(float("nan"), store.queue_depth),
                            _unavailable_as({}, store.count_by_status))
        runner = JobRunner(
            store, backend, inputs, ledger, metrics,
            max_concurrent_jobs=settings.job_concurrency(backend), max_queued_jobs=settings.max_queued_jobs,
            job_timeout_s=settings.job_timeout_s, cancel_poll_s=settings.cancel_poll_s,
            purge_interval_s=settings.purge_interval_s, run_jobs=role != "api",
        )
        app.state.diffserve = AppState(
            settings=settings, backend=backend, store=store, runner=runner, inputs=inputs, ledger=ledger,
            limiter=limiter, metrics=metrics, image_policy=settings.image_fetch_policy(),
            api_keys=[k.encode("utf-8", "surrogateescape") for k in settings.api_key_values()],
            models_by_owner={owner: frozenset(slugs) for owner, slugs in models_by_owner.items()},
            role=role,
        )
        if not settings.api_keys and role != "worker":
            logger.warning("no API keys configured: the API is open to anyone who can reach it")
        where = f"Redis at {store.address}" if settings.redis_url else str(settings.data_dir)
        logger.info("%s role: %s %s; jobs in %s", role, "queueing" if role == "api" else "serving",
                    ", ".join(sorted(backend.slugs)) or "no models", where)
        try:
            await runner.start()
            yield
        finally:
            await runner.stop()
            await backend.close()
            ledger.close()
            store.close()

    app = FastAPI(title="diffserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    if role != "worker":
        app.include_router(models.generation_router(backend.slugs))
        app.include_router(requests.router)
    app.include_router(health.router)
    return app
