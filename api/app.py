"""``create_app(settings, backend, role=...)``: the FastAPI application serving the Segmind contract.

Roles: ``all`` (today's single process: the routes and the job runner on ``backend``), ``api``
(a stateless replica on a shared Redis store: the routes, no jobs run here; ``backend`` is a
``QueueOnlyBackend``) and ``worker`` (only health and metrics routes; the runner takes the jobs
of ``backend``'s slugs from Redis). ``diffserve.api.queue.open_stores`` chooses the store from the
settings: the embedded SQLite store of one process, or the Redis store, queue, credits and rate
limits shared by every replica and worker; nothing else asks which one it is.

The app owns the job store, the job runner, credits and rate limits, idempotency keys and the
webhook deliverer (``diffserve.api.webhooks``, in every role: any process with the store and webhook
secrets delivers) for its lifetime (built in the lifespan, closed at shutdown, together with the
backend it was given). Routes live in ``api/routes``; dependencies in ``api/deps``; wire schemas in ``api/schemas``. An outer ASGI
middleware enforces the body-size limit, records HTTP metrics and adds ``X-remaining-credits``
to every 200 an authenticated caller gets.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import asynccontextmanager

from collections.abc import Collection

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffserve.api.backend import GenerationBackend
from diffserve.api.deps import AppState
from diffserve.api.errors import BodyTooLarge, error_response, install_error_handlers
from diffserve.api.metrics import ApiMetrics, slug_label
from diffserve.api.queue import check_role, open_stores
from diffserve.api.routes import events, health, models, openai_images, requests
from diffserve.api.routes.openai_images import OPENAI_PREFIX, openai_error_response
from diffserve.api.routes.requests import result_json
from diffserve.api.runner import JobRunner
from diffserve.api.settings import Settings
from diffserve.api.webhooks import WebhookDeliverer
from diffserve.engine.catalog import CATALOG

logger = logging.getLogger(__name__)

DESCRIPTION = """Self-hosted serving of the Segmind image models with the same HTTP contract.

* `POST /v1/{slug}`: generate and return the image (or base64 JSON with `base64=true`).
* `POST /v2/{slug}`: queue; poll `GET /v2/requests/{id}/status`; fetch `GET /v2/requests/{id}`.
* Each served slug has its own pair of operations below, with that model's request schema.
* `GET /v2/requests/{id}/events`: the same as server-sent events (queued, progress, the result).
* `POST /v2/{slug}` takes an `Idempotency-Key` header (a retry gets the original request id) and a
  `webhook` URL in the body (the result is POSTed to it, signed per Standard Webhooks).
* `POST /v1/images/generations`, `POST /v1/images/edits`: the OpenAI images dialect (errors in
  OpenAI's shape there).
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
                message = f"request body is {declared} bytes, over the limit of {limit} bytes"
                shape = openai_error_response if scope["path"].startswith(OPENAI_PREFIX) else error_response
                response = shape(413, message, headers={"Connection": "close"})
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, limited_receive, send_with_headers)
        finally:
            route = scope.get("route")
            # Per-slug generation routes carry the label of their family (diffserve.api.routes.models).
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
    from diffserve.api.redis_client import StoreUnavailable

    def read():
        try:
            return fn()
        except StoreUnavailable:
            return default
    return read


def create_app(settings: Settings, backend: GenerationBackend, *, role: str = "all") -> FastAPI:
    """Build the app; it takes ownership of ``backend`` (closed at shutdown)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    check_role(settings, role)
    unknown = sorted(set(backend.slugs) - set(CATALOG))
    if unknown:
        raise ValueError(f"the backend serves slugs the catalog does not know: {', '.join(unknown)}")
    metrics = ApiMetrics()
    triton_restarts = getattr(backend, "triton_restarts", None)
    if triton_restarts is not None:  # a Triton server this process started and supervises
        metrics.watch_triton_restarts(triton_restarts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stores = open_stores(settings, role)
        store, ledger, limiter = stores.jobs, stores.ledger, stores.limiter
        _, models_by_owner = settings.per_owner(settings.key_models)
        webhook_options = settings.webhook_options()
        metrics.watch_store(_unavailable_as(float("nan"), store.queue_depth),
                            _unavailable_as({}, store.count_by_status))
        runner = JobRunner(
            store, backend, ledger, metrics,
            max_concurrent_jobs=settings.job_concurrency(backend), max_queued_jobs=settings.max_queued_jobs,
            job_timeout_s=settings.job_timeout_s, cancel_poll_s=settings.cancel_poll_s,
            purge_interval_s=settings.purge_interval_s, run_jobs=role != "api",
        )
        app.state.diffserve = AppState(
            settings=settings, backend=backend, store=store, runner=runner, ledger=ledger,
            limiter=limiter, metrics=metrics, image_policy=settings.image_fetch_policy(),
            api_keys=[k.encode("utf-8", "surrogateescape") for k in settings.api_key_values()],
            models_by_owner={owner: frozenset(slugs) for owner, slugs in models_by_owner.items()},
            priority_caps=settings.per_owner(settings.max_priority),
            role=role, idempotency=stores.idempotency, webhooks=stores.webhooks,
            webhook_options=webhook_options,
        )
        deliverer = WebhookDeliverer(stores.webhooks, store, webhook_options,
                                     functools.partial(result_json, store=store), metrics=metrics)
        if not settings.api_keys and role != "worker":
            logger.warning("no API keys configured: the API is open to anyone who can reach it")
        logger.info("%s role: %s %s; jobs in %s at %s", role, "queueing" if role == "api" else "serving",
                    ", ".join(sorted(backend.slugs)) or "no models", store.name, store.address)
        try:
            await runner.start()
            await deliverer.start()
            yield
        finally:
            await deliverer.stop()
            await runner.stop()
            await backend.close()
            ledger.close()
            stores.idempotency.close()
            stores.webhooks.close()
            store.close()

    app = FastAPI(title="diffserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    if role != "worker":
        app.include_router(models.generation_router(backend.slugs))
        app.include_router(requests.router)
        app.include_router(events.router)
        app.include_router(openai_images.router)
    app.include_router(health.router)
    return app
