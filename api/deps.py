"""Request dependencies and their ``Annotated`` aliases: app state, caller (auth), rate limit and
priority of a submission, served model, JSON body, and a job owned by the caller.

Auth: the key comes from ``x-api-key`` (what the Segmind SDK sends) or ``Authorization: Bearer``;
it is compared in constant time against every configured key and never logged or stored: the
caller is identified by ``owner_from_api_key``. With no keys configured the server is open and
every caller's owner is None.

Priority: a submission may carry ``X-Priority: N`` (0 to 9, default 0), a header rather than a
body field because it is about the queue, not the image: the model's parameters (the catalog's
schema, the Segmind SDK's and the OpenAI dialect's bodies) stay as they are, and every submit
route of every dialect takes it the same way. Above the caller's cap (``max_priority``) is a 403.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import Depends, Request

from diffserve.api.backend import GenerationBackend
from diffserve.api.errors import ApiError
from diffserve.api.idempotency import IdempotencyStore
from diffserve.api.images import ImageFetchPolicy
from diffserve.api.jobs import MAX_PRIORITY, Job, is_job_id
from diffserve.api.metrics import ApiMetrics
from diffserve.api.queue import JobQueue
from diffserve.api.quotas import CreditLedger, RateLimiter, retry_after_header
from diffserve.api.runner import JobRunner
from diffserve.api.settings import Settings, owner_from_api_key
from diffserve.api.webhooks import WebhookOptions, WebhookOutbox
from diffserve.engine.catalog import ModelSpec, UnknownModelError, get_model


@dataclass
class AppState:
    """Everything the routes share; built by the app's lifespan."""

    settings: Settings
    backend: GenerationBackend
    store: JobQueue
    runner: JobRunner
    ledger: CreditLedger
    limiter: RateLimiter
    metrics: ApiMetrics
    image_policy: ImageFetchPolicy
    api_keys: list[bytes]
    models_by_owner: dict[str, frozenset[str]]
    priority_caps: tuple[int | None, dict[str, int]] = (0, {})
    """``Settings.per_owner(max_priority)``: the cap of every caller, or None and a cap per owner."""
    role: str = "all"
    """``all``, ``api`` or ``worker`` (``diffserve.api.app.ROLES``)."""
    idempotency: IdempotencyStore | None = None
    webhooks: WebhookOutbox | None = None
    webhook_options: WebhookOptions | None = None
    _workers_seen: tuple[float, frozenset[str]] = field(default=(0.0, frozenset()), repr=False)

    def served_slugs(self) -> list[str]:
        """Slugs a request may ask for: this process's backend's, and every slug a live worker of
        another process announces on the store (an ``api`` replica serves only those; the embedded
        store has none). Read at most once a second; blocking on Redis: call it in a thread."""
        own = set() if self.role == "api" else set(self.backend.slugs)
        seen_at, workers = self._workers_seen
        if time.monotonic() - seen_at > 1.0:
            workers = frozenset(self.store.served_slugs())  # StoreUnavailable: a 503 for the request
            self._workers_seen = (time.monotonic(), workers)
        return sorted(own | workers)

    def public_base(self, request: Request) -> str:
        """Base of absolute URLs: ``public_url`` if set, else the scheme and host the client used."""
        return self.settings.public_url or str(request.base_url).rstrip("/")


def get_state(request: Request) -> AppState:
    return request.app.state.diffserve


StateDep = Annotated[AppState, Depends(get_state)]


@dataclass(frozen=True)
class Caller:
    owner: str | None
    """``owner_from_api_key`` of the caller's key; None on an open server."""
    bucket: str
    """Rate-limit bucket: the owner, or the client address on an open server."""
    priority: int = 0
    """The submission's ``X-Priority`` (submit routes only: ``SubmitterDep``)."""


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def authenticate(request: Request, state: StateDep) -> Caller:
    presented = _presented_key(request)
    if not state.api_keys:
        host = request.client.host if request.client else "unknown"
        caller = Caller(owner=None, bucket=f"address:{host}")
    else:
        if presented is None:
            raise ApiError(401, "missing API key: send it in the x-api-key header (or as Authorization: Bearer)",
                           {"WWW-Authenticate": "Bearer"})
        candidate = presented.encode("utf-8", "surrogateescape")
        matched = False
        for key in state.api_keys:  # every key is compared, so timing does not reveal which one matched
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise ApiError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
        owner = owner_from_api_key(presented)
        caller = Caller(owner=owner, bucket=owner)
    request.state.caller_owner = caller.owner
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def request_priority(request: Request, caller: Caller, state: AppState) -> int:
    """The ``X-Priority`` of a submission: 400 unless an integer 0 to 9, 403 above the caller's cap."""
    raw = request.headers.get("x-priority")
    if raw is None:
        return 0
    try:
        priority = int(raw.strip())
    except ValueError:
        priority = -1
    if not 0 <= priority <= MAX_PRIORITY:
        raise ApiError(400, f"X-Priority must be an integer from 0 to {MAX_PRIORITY}, got {raw[:20]!r}")
    default, by_owner = state.priority_caps
    cap = by_owner.get(caller.owner, default or 0) if caller.owner is not None else (default or 0)
    if priority > cap:
        raise ApiError(403, f"X-Priority {priority} refused: this API key may ask for priority up to {cap}")
    return priority


async def rate_limited(request: Request, caller: CallerDep, state: StateDep) -> Caller:
    caller = replace(caller, priority=request_priority(request, caller, state))
    wait_s = await asyncio.to_thread(state.limiter.check, caller.bucket, caller.owner)
    if wait_s is not None:
        limit = state.limiter.limit(caller.owner)
        raise ApiError(429, f"rate limit exceeded: {limit} generation requests per minute; "
                            f"retry in {retry_after_header(wait_s)} s", {"Retry-After": retry_after_header(wait_s)})
    return caller


SubmitterDep = Annotated[Caller, Depends(rate_limited)]


async def served_model(slug: str, request: Request, caller: SubmitterDep, state: StateDep) -> ModelSpec:
    served = await asyncio.to_thread(state.served_slugs)
    try:
        spec = get_model(slug)
    except UnknownModelError:
        raise ApiError(404, f"unknown model {slug!r}; available: {', '.join(served) or 'none'}") from None
    allowed = state.models_by_owner.get(caller.owner) if caller.owner else None
    if allowed is not None and slug not in allowed:
        raise ApiError(403, f"this API key may not use {slug!r}; it may use: {', '.join(sorted(allowed)) or 'none'}")
    if slug not in served:
        raise ApiError(404, f"model {slug!r} is not served by this server (no checkpoint for it is loaded); available: "
                            f"{', '.join(served) or 'none'}")
    request.state.metrics_slug = slug
    return spec


ServedModelDep = Annotated[ModelSpec, Depends(served_model)]


async def json_body(request: Request) -> dict:
    """The request body as a JSON object; 400 for an empty, malformed or non-object body."""
    raw = await request.body()  # the size guard raises BodyTooLarge past max_body_bytes
    if not raw.strip():
        raise ApiError(400, "request body is empty; send a JSON object with the model's parameters")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON in the request body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON in the request body: nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    try:
        # JSON may spell lone UTF-16 surrogates (\ud800) that no tokenizer or database accepts.
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "request body contains invalid Unicode (a lone surrogate escape)") from None
    return payload


JsonBodyDep = Annotated[dict, Depends(json_body)]


async def owned_job(request_id: str, request: Request, caller: CallerDep, state: StateDep) -> Job:
    job = await read_job(state, request_id)
    if job is None:
        raise ApiError(404, f"request {request_id!r} not found: unknown, or expired (results are kept "
                            f"{state.settings.retention_s:g} s)")
    if job.owner is not None and job.owner != caller.owner:
        raise ApiError(403, f"request {request_id!r} belongs to another API key")
    request.state.metrics_slug = job.slug
    request.state.request_id = job.id
    return job


OwnedJobDep = Annotated[Job, Depends(owned_job)]


async def read_job(state: AppState, request_id: str) -> Job | None:
    """The job named by a path parameter, or None (malformed, unknown or expired id)."""
    if not is_job_id(request_id):
        return None
    return await asyncio.to_thread(state.store.get, request_id)


def get_store(request: Request) -> JobQueue:
    return get_state(request).store


StoreDep = Annotated[JobQueue, Depends(get_store)]
