"""Pydantic response schemas of the HTTP API and the OpenAPI request schemas read from the catalog.

These are the wire shapes (Segmind's contract plus what the official SDK reads); they are kept
apart from ``diffserve.api.jobs.Job`` and the engine's types so either side can change without the other.
Request bodies are not pydantic models: they are validated by ``diffserve.engine.catalog`` (one source of
truth for every parameter), and their OpenAPI schemas are generated from it here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from diffserve.engine.catalog import ModelSpec, ParamType


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, for a human.")


class SubmitResponse(BaseModel):
    request_id: str
    status: str = Field("QUEUED", description="Always QUEUED on submission.")
    status_url: str = Field(description="Absolute URL of GET /v2/requests/{id}/status.")
    response_url: str = Field(description="Absolute URL of GET /v2/requests/{id} (the result).")
    poll_url: str = Field(description="Same as status_url (kept for clients that read this name).")


class Progress(BaseModel):
    step: int
    total: int | None = None


class StatusResponse(BaseModel):
    request_id: str
    status: str = Field(description="QUEUED, PROCESSING, COMPLETED or FAILED.")
    error: str | None = Field(None, description="Why the request FAILED (only when FAILED).")
    progress: Progress | None = Field(None, description="Denoising steps done (only while PROCESSING).")
    queue_position: int | None = Field(None, description="Requests ahead of this one (only while QUEUED).")
    cancel_requested: bool | None = Field(None, description="Set while a cancel of a running request is pending.")


class ResultResponse(BaseModel):
    request_id: str
    status: str
    output: list[str] | None = Field(
        None, description="Absolute URLs of the images, or base64 strings when the request asked base64=true.")
    error: str | None = None
    seed: int | None = Field(None, description="The seed used (a drawn one when the request said -1).")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds: inference_time (backend compute), queue_time, total_time, encode_time, "
                    "and backend_<stage>_time per pipeline stage.")


class Base64ImageResponse(BaseModel):
    image: str | list[str] = Field(description="Base64 image, or a list when more than one was generated.")


class Health(BaseModel):
    status: str
    reason: str | None = None


class Readiness(BaseModel):
    ready: bool
    backend: dict[str, bool]
    models: list[str]
    error: str | None = None
    unavailable: dict[str, list[str]] | None = None
    """Configured slugs not served because their artifacts are incomplete, with the problems."""


# -- OpenAPI request bodies ----------------------------------------------------------------------

_JSON_TYPES = {
    ParamType.STRING: "string", ParamType.INTEGER: "integer", ParamType.NUMBER: "number",
    ParamType.BOOLEAN: "boolean", ParamType.IMAGE: "string",
}


def request_schema(spec: ModelSpec) -> dict[str, Any]:
    """JSON schema of ``spec``'s request body, for the docs only (validation is the catalog's)."""
    properties: dict[str, Any] = {}
    for p in spec.params:
        prop: dict[str, Any] = {"type": _JSON_TYPES[p.type], "description": p.description}
        if p.type is ParamType.IMAGE:
            prop["description"] += " (http(s) URL, base64 or data URI)"
        if p.default is not None:
            prop["default"] = p.default
        if p.minimum is not None:
            prop["minimum"] = p.minimum
        if p.maximum is not None:
            prop["maximum"] = p.maximum
        if p.choices is not None:
            prop["enum"] = list(p.choices)
        if p.max_length is not None:
            prop["maxLength"] = p.max_length
        if p.example is not None:
            prop["examples"] = [p.example]
        properties[p.name] = prop
    return {
        "title": f"{spec.slug} request",
        "type": "object",
        "description": f"{spec.title}: {spec.description}",
        "properties": properties,
        "required": [p.name for p in spec.params if p.required],
        "additionalProperties": False,
    }


def request_body_openapi(spec: ModelSpec, *, queued: bool = False) -> dict[str, Any]:
    """``openapi_extra`` of ``spec``'s submit operations (``/v1/<slug>``, ``/v2/<slug>``): its request
    body; with ``queued`` (``/v2``) also the ``webhook`` field and the ``Idempotency-Key`` header."""
    schema = request_schema(spec)
    extra: dict[str, Any] = {}
    if queued:
        schema["properties"]["webhook"] = {
            "type": "string", "format": "uri",
            "description": "URL POSTed the result (the body of GET /v2/requests/{id}) once the request is "
                           "COMPLETED or FAILED, signed per Standard Webhooks; retried for hours until it answers 2xx."}
        extra["parameters"] = [{
            "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
            "description": "Retries with the same key and body get the original request id (no second job or "
                           "charge); the key with another body: 422; while the first is being submitted: 409."}]
    return {
        **extra,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        },
    }
