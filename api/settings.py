"""Configuration of the HTTP API: one typed ``Settings`` object read from ``DIFFSERVE_*`` variables.

Every knob of the API server lives here (network, data directory, auth and quotas, the job
queue, limits on request bodies and image inputs, and the local backend's checkpoints), with a
docstring under each field. The CLI builds a ``Settings`` from the environment and overrides
fields from its flags; tests build one directly. Lists and maps may be given in the
environment as JSON (``DIFFSERVE_API_KEYS='["k1", "k2"]'``); lists also as comma-separated text
(``DIFFSERVE_API_KEYS=k1,k2``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, TypeAdapter, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffserve.api.images import ImageFetchPolicy
from diffserve.api.secret_files import read_secret_file
from diffserve.api.jobs import MAX_PRIORITY
MIB = 1024 * 1024


def owner_from_api_key(api_key: str) -> str:
    """A stable, non-reversible owner id for an API key: what the job store, the credit ledger
    and per-key settings are keyed by (the key itself is never stored or logged)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _split_list(value: Any) -> Any:
    """Accept a JSON list or comma-separated text where the environment gives a string."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def _secret_or_json(text: str, annotation: Any) -> Any:
    """A secret file's text as its setting's type: JSON (``{key: secret}``) when it parses as JSON,
    else the text itself, as pydantic-settings reads the same value from the environment."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return TypeAdapter(annotation).validate_python(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFSERVE_", extra="ignore", validate_default=True)

    # -- network ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Interface to listen on (``0.0.0.0`` for every interface)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port; 0 picks a free one (the CLI prints the URL it got)."""
    public_url: str | None = None
    """Base of the absolute URLs returned to clients (``https://img.example.com``); default:
    derived from each request's scheme and ``Host`` header."""

    # -- storage ---------------------------------------------------------------------------------
    data_dir: Path = Path("var/api")
    """Holds the job database (with the stored image inputs of queued jobs), credits and generated outputs."""
    retention_s: float = Field(3600.0, gt=0)
    """How long a finished request's status and images stay available (Segmind: one hour)."""
    purge_interval_s: float = Field(60.0, gt=0)
    """How often expired requests and their files are deleted."""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """SQLite ``synchronous`` of the embedded job store. ``FULL``: a submission's 200 is sent after
    the job is fsynced, so an accepted job survives a power loss or host crash (as on Redis with
    ``appendfsync always``). ``NORMAL``: one fsync fewer per write (WAL checkpoints only), durable
    across a crash of the process but a power loss can roll back the last accepted jobs. See
    ``diffserve bench store`` for the cost on your disk."""

    # -- auth and quotas -------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, repr=False)
    """Accepted API keys (``x-api-key`` header or ``Authorization: Bearer``). Empty: the server is
    open to anyone (a warning is logged at start)."""
    credits: int | dict[str, int] | None = Field(None, repr=False)
    """Credits per key (one credit = one generated image, debited only on success): an int for
    every key, or ``{key: credits}`` (keys not listed are unlimited). None: unlimited."""
    rate_limit_per_minute: int | dict[str, int] = Field(0, repr=False)
    """Generation requests (``POST /v1|v2/{slug}``) allowed per key and minute, as a token bucket;
    an int for every key or ``{key: limit}``. 0: no limit. On an open server it applies per
    client address. Polling endpoints are not limited (the SDK polls every second)."""
    key_models: dict[str, list[str]] | None = Field(None, repr=False)
    """Optional ``{key: [slug, ...]}``: models each listed key may use (others get 403)."""
    max_priority: int | dict[str, int] = Field(0, repr=False)
    """Highest ``X-Priority`` (0 to 9) a caller may ask for: an int for every key (and every
    caller of an open server) or ``{key: cap}`` (keys not listed: 0). Higher asks get 403."""

    # -- job queue -------------------------------------------------------------------------------
    max_concurrent_jobs: int | None = Field(None, ge=1)
    """Jobs (v1 and v2 alike) running against the backend at once (per worker on Redis). None:
    the backend's batch capacity (``job_concurrency``), so a batching backend gets enough requests
    in flight to fill its batches; 1 for a backend that does not batch."""
    max_queued_jobs: int = Field(1000, ge=1)
    """Queued jobs beyond which new submissions get 429."""
    sync_timeout_s: float = Field(300.0, gt=0)
    """How long a ``POST /v1`` request waits (queue + generation) before a 504; its job is
    cancelled then."""
    job_timeout_s: float = Field(600.0, gt=0)
    """Longest a single generation may run on the backend before it is cancelled and failed."""
    request_max_attempts: int = Field(2, ge=1)
    """Attempts per job: a job interrupted by a crash is re-run until it has had this many. On
    Redis it caps deliveries: a job whose worker went silent this many times ends FAILED."""
    cancel_poll_s: float = Field(0.2, gt=0)
    """How often a running job's cancel flag, progress and deadline are checked."""
    priority_aging_s: float = Field(60.0, gt=0)
    """Anti-starvation: a queued job of priority ``p`` is ordered as if submitted ``p`` times this
    earlier, so higher priority goes first but no job is overtaken by jobs submitted more than
    9 times this after it."""
    events_poll_s: float = Field(0.25, gt=0)
    """How often ``GET /v2/requests/{id}/events`` re-reads its job from the store (any replica
    serves any job's events because it reads the shared store)."""
    events_keepalive_s: float = Field(15.0, gt=0)
    """Longest an event stream stays silent: a comment line is sent after this long without an
    event, so proxies do not close an idle connection."""

    # -- idempotency and webhooks (diffserve.api.idempotency, diffserve.api.webhooks) -----------------------------------
    idempotency_retention_s: float = Field(86400.0, gt=0)
    """How long an ``Idempotency-Key`` of a ``POST /v2/{slug}`` is remembered: a retry with the same
    key and body within it gets the original request id (and no second job, no second charge)."""
    webhook_secret: str | dict[str, str] | None = Field(None, repr=False)
    """Standard Webhooks signing secret (``whsec_`` + base64 of 24 to 64 random bytes): one for
    every key (and for an open server), or ``{key: secret}``. A request may name a webhook only
    when its key has a secret: every delivery is signed."""
    webhook_secret_file: Path | None = None
    """A file holding ``webhook_secret`` (a mounted Docker/Kubernetes secret), in the same forms:
    one secret, or JSON ``{key: secret}``; surrounding whitespace is stripped. Keeps the secrets
    out of the environment and process listings; setting both this and ``webhook_secret`` is an
    error."""
    webhook_url: str | dict[str, str] | None = Field(None, repr=False)
    """Webhook called for a ``/v2`` request that names none: one URL for every key, or ``{key: url}``."""
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0])
    """Waits before each retry of a failed delivery (non-2xx, connection error, timeout), the
    Standard Webhooks schedule by default (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h); after the
    last one fails the delivery is dropped and logged."""
    webhook_retry_jitter: float = Field(0.1, ge=0, lt=1)
    """Each retry wait is drawn from ``wait * (1 ± jitter)`` so receivers that went down together
    are not hit by every sender at the same instant when they come back."""
    webhook_timeout_s: float = Field(15.0, gt=0)
    """Longest one delivery attempt may take (connect, send, answer); past it the attempt failed."""
    webhook_poll_s: float = Field(1.0, gt=0)
    """How often the outbox is checked for due deliveries (and pending ones for a finished job)."""
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """CIDRs webhook URLs may point into although they are not public (as
    ``image_allow_networks``, which stays separate); cloud metadata addresses stay refused."""

    # -- scale-out (Redis) ------------------------------------------------------------------------
    redis_url: str | None = None
    """``redis://host:port/db`` (``rediss://`` for TLS, ``redis://[USER]:PASSWORD@host...`` with
    credentials) of the shared job store, queue, credits and rate limits (API
    replicas and workers); None: the embedded SQLite store of a single process. Run Redis with
    ``appendonly yes``, ``appendfsync always`` and ``maxmemory-policy noeviction``."""
    redis_password_file: Path | None = None
    """A file holding the Redis password (a mounted Docker/Kubernetes secret; ``requirepass`` or
    an ACL user's, the user then in the URL: ``redis://USER@host:6379/0``). Used when
    ``redis_url`` carries no password; keeps it out of the environment and process listings."""
    redis_namespace: str = "diffserve"
    """Prefix of every Redis key (one Redis may hold several deployments)."""
    reclaim_idle_s: float = Field(30.0, gt=0)
    """A job whose worker has not heartbeaten for this long is taken over by another worker; a
    running job heartbeats every quarter of it, so a long job is never reclaimed."""

    # -- request limits --------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * MIB, gt=0)
    """Largest request body (checked on Content-Length and on the bytes actually received)."""
    image_max_bytes: int = Field(20 * MIB, gt=0)
    image_timeout_s: float = Field(15.0, gt=0)
    image_max_redirects: int = Field(3, ge=0)
    image_max_pixels: int = Field(40_000_000, gt=0)
    image_allowed_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
    image_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """CIDRs image URLs may point into although they are not public (e.g. ``10.0.0.0/8`` for an
    internal bucket). Cloud metadata addresses stay refused."""

    # -- Triton backend --------------------------------------------------------------------------
    repository: Path | None = None
    """Triton model repository built by ``diffserve export`` (``--backend triton``)."""
    triton_url: str | None = None
    """gRPC address (``host:port``) of a Triton server someone else runs; default: start one on
    ``repository``."""
    triton_startup_timeout_s: float = Field(600.0, gt=0)
    """How long a Triton server started by the API may take to load the repository."""
    triton_restart_backoff_s: float = Field(1.0, gt=0)
    """Wait before restarting a Triton server started by the API that died; doubles after each
    attempt up to 30 s (back to this value once the server has stayed up for 30 s)."""
    triton_unhealthy_after_s: float = Field(60.0, gt=0)
    """``/healthz`` answers 503 once the Triton server this process started has been down this
    long (not for a ``triton_url`` server: someone else runs that one)."""
    triton_timeout_s: float | None = Field(None, gt=0)
    """gRPC deadline of one pipeline-model request (default: ``job_timeout_s``); past it Triton
    cancels the request and the job fails with 504."""

    # -- models ----------------------------------------------------------------------------------
    models_file: Path | None = Field(None, validation_alias=AliasChoices("models_file", "DIFFSERVE_MODELS"))
    """The models file (``models.toml``, env ``DIFFSERVE_MODELS``): each slug's published artifacts.
    ``serve`` checks it at start and serves the complete slugs (local backend: materialized checkpoints;
    triton: a repository built from it); ``diffserve models check`` prints what is missing."""

    # -- local backend ---------------------------------------------------------------------------
    checkpoints: dict[str, Path] = Field(default_factory=dict)
    """``{slug: local diffusers checkpoint dir}`` for ``--backend local``."""
    device: str | None = None
    """Torch device for the local backend (default: cuda if available)."""
    precision: str | None = None
    """fp32, fp16 or bf16 for the local backend (default: fp16 on GPU, fp32 on CPU)."""
    torch_optimizations: str | None = None
    """``diffserve.engine.torch_optimize`` spec for the local backend, e.g. ``fast`` or ``fuse_qkv,compile``."""
    batching: bool = True
    """Step-level batching (``diffserve.engine.batching``) of concurrent requests: per checkpoint in the local
    backend; per fused pipeline instance in a Triton repository that ``serve`` builds (``--demo``,
    ``--models``; a repository built by ``diffserve export`` carries its own, ``--no-batching``)."""
    max_batch: int = Field(8, ge=1)
    """Most UNet rows in one batched call (a CFG request with N samples takes 2N); as ``batching``."""
    batch_buckets: Annotated[list[int], NoDecode] = Field(default_factory=list)
    """Batch sizes a call is padded up to (those compiled or captured as CUDA graphs), increasing, the
    largest at least ``max_batch``; empty: no padding. As ``batching``."""

    @field_validator("torch_optimizations")
    @classmethod
    def _valid_optimizations(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from diffserve.engine.torch_optimize import TorchOptimizations

        return TorchOptimizations.parse(value).spec()

    @field_validator("batch_buckets")
    @classmethod
    def _valid_buckets(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value) or value != sorted(set(value)):
            raise ValueError(f"batch_buckets must be increasing positive sizes, got {value}")
        return value

    @field_validator("api_keys", "image_allowed_formats", "image_allow_networks", "batch_buckets",
                     "webhook_retry_schedule_s", "webhook_allow_networks", mode="before")
    @classmethod
    def _lists_from_text(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.webhook_secret_file is not None:
            if self.webhook_secret is not None:
                raise ValueError("set webhook_secret or webhook_secret_file, not both")
            self.webhook_secret = _secret_or_json(read_secret_file(self.webhook_secret_file, "webhook secret"),
                                                  type(self).model_fields["webhook_secret"].annotation)
        keys = self.api_key_values()
        if any(not k for k in keys):
            raise ValueError("api_keys contains an empty key")
        for name in ("credits", "rate_limit_per_minute", "key_models", "max_priority", "webhook_secret",
                     "webhook_url"):
            value = getattr(self, name)
            if isinstance(value, dict):
                if not keys:
                    raise ValueError(f"{name} is given per key but api_keys is empty")
                if any(k not in keys for k in value):
                    # The message never echoes the offending key.
                    raise ValueError(f"{name} names a key that is not in api_keys")
        if self.credits is not None and not keys:
            raise ValueError("credits are given but api_keys is empty: credits are counted per key")
        numbers = [self.credits] if isinstance(self.credits, int) else list((self.credits or {}).values())
        if any(n < 0 for n in numbers):
            raise ValueError("credits must be >= 0")
        limits = ([self.rate_limit_per_minute] if isinstance(self.rate_limit_per_minute, int)
                  else list(self.rate_limit_per_minute.values()))
        if any(n < 0 for n in limits):
            raise ValueError("rate_limit_per_minute must be >= 0")
        caps = [self.max_priority] if isinstance(self.max_priority, int) else list(self.max_priority.values())
        if any(not 0 <= n <= MAX_PRIORITY for n in caps):
            raise ValueError(f"max_priority must be 0 to {MAX_PRIORITY}")
        if self.key_models:
            from diffserve.engine.catalog import CATALOG

            unknown = sorted({s for slugs in self.key_models.values() for s in slugs} - set(CATALOG))
            if unknown:
                raise ValueError(f"key_models names unknown models: {', '.join(unknown)}")
        self.image_fetch_policy()  # invalid CIDRs fail here, at start-up
        self.webhook_options()  # and invalid secrets, default URLs or retry schedules
        self.batching_options()
        return self

    # -- derived values --------------------------------------------------------------------------

    def batching_options(self):
        """The local backend's ``diffserve.engine.options.BatchingOptions``, or None with batching off."""
        if not self.batching:
            return None
        from diffserve.engine.options import BatchingOptions

        return BatchingOptions(max_batch=self.max_batch, buckets=tuple(self.batch_buckets))

    def repository_batching(self) -> dict[str, Any]:
        """The batching fields of ``diffserve.export.repository.RepositoryOptions`` for a repository ``serve`` builds."""
        return {"batching": self.batching, "max_batch": self.max_batch, "batch_buckets": tuple(self.batch_buckets)}

    def job_concurrency(self, backend: Any) -> int:
        """Jobs the runner keeps in flight: ``max_concurrent_jobs`` if set, else the backend's
        ``batch_capacity`` (1 when it has none)."""
        if self.max_concurrent_jobs is not None:
            return self.max_concurrent_jobs
        return max(1, int(getattr(backend, "batch_capacity", 1)))

    def api_key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys]

    def per_owner(self, value: int | dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        """Split a per-key setting into (value for every key, ``{owner id: value}``)."""
        if isinstance(value, dict):
            return None, {owner_from_api_key(k): v for k, v in value.items()}
        return value, {}

    @property
    def jobs_db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    def webhook_options(self):
        """The webhook deliverer's ``diffserve.api.webhooks.WebhookOptions`` (secrets and URLs by owner)."""
        from diffserve.api.webhooks import WebhookOptions

        return WebhookOptions.from_settings(self)

    def image_fetch_policy(self) -> ImageFetchPolicy:
        return ImageFetchPolicy(
            max_bytes=self.image_max_bytes,
            timeout_s=self.image_timeout_s,
            max_redirects=self.image_max_redirects,
            max_pixels=self.image_max_pixels,
            allowed_formats=frozenset(f.upper() for f in self.image_allowed_formats),
            allow_networks=tuple(self.image_allow_networks),
        )
