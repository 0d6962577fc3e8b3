"""The OpenAI images dialect: ``POST /v1/images/generations`` and ``POST /v1/images/edits``, so the
``openai`` SDK and tools built on it drive the served models unchanged.

A request is translated into the Segmind parameters of its ``model`` (a catalog slug) and then
takes the ``/v1`` path itself: the same model check (``served_model``: 404 unknown or unserved,
403 not allowed for the key), catalog validation, credit check and image decoding
(``_prepare``), and the same queue and wait (``run_sync``). ``n`` is ``samples``; ``size``
("WxH") must be one the slug offers; ``response_format`` is ``url`` (default: the
``/v2/requests/{id}/outputs/..`` URLs, kept for the retention period) or ``b64_json``. Any other
parameter of the slug (``seed``, ``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``scheduler``, and ``strength`` on edits) is an extension field, sent by the
SDK through ``extra_body``. ``user`` is accepted and ignored, as OpenAI uses it for abuse
monitoring only. Errors on these routes, and only here, are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (``OpenAIRoute``); the status codes stay
this API's (406 for credits, 429 for rate limits and a full queue).
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile

from diffserve.api.deps import JsonBodyDep, StateDep, SubmitterDep, served_model
from diffserve.api.errors import ApiError, BodyTooLarge, _describe_validation
from diffserve.api.openai_schemas import ImagesResponse, OpenAIErrorResponse, OpenAIImage
from diffserve.api.redis_client import StoreUnavailable
from diffserve.api.routes.models import _prepare, run_sync
from diffserve.api.runner import ClientGone
from diffserve.api.urls import output_urls
from diffserve.engine.catalog import CATALOG, ModelSpec

logger = logging.getLogger(__name__)

GENERATION_PIPELINES = ("txt2img",)
EDIT_PIPELINES = ("sd15_img2img",)
RESPONSE_FORMATS = ("url", "b64_json")
_SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_IGNORED = ("user",)
_TRANSLATED = ("prompt", "samples", "img_width", "img_height", "base64", "image")
"""Slug parameters set from OpenAI fields, never taken as extension fields."""

_CODES = {401: "invalid_api_key", 403: "model_not_allowed", 404: "model_not_found", 406: "insufficient_quota",
          413: "request_too_large", 429: "rate_limit_exceeded", 504: "timeout"}


class OpenAIError(ApiError):
    """An ``ApiError`` naming the request field at fault (``param``) and an OpenAI ``code``."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(status_code, message, headers)
        self.param = param
        self.code = code


def openai_error_response(status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                          headers: Mapping[str, str] | None = None) -> JSONResponse:
    kind = "server_error" if status_code >= 500 else (
        "authentication_error" if status_code == 401 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status_code)}}
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


class OpenAIRoute(APIRoute):
    """A route whose errors, its dependencies' included (auth, rate limit, body), are OpenAI-shaped."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return openai_error_response(exc.status_code, exc.message, param=getattr(exc, "param", None),
                                             code=getattr(exc, "code", None), headers=exc.headers)
            except RequestValidationError as exc:
                return openai_error_response(400, _describe_validation(exc))
            except BodyTooLarge as exc:
                return openai_error_response(413, str(exc), headers={"Connection": "close"})
            except StoreUnavailable as exc:
                logger.warning("%s %s: %s", request.method, request.url.path, exc)
                return openai_error_response(503, "service temporarily unavailable: the job store cannot be "
                                                  "reached; retry shortly", headers={"Retry-After": "2"})

        return openai_errors


OPENAI_PREFIX = "/v1/images"
"""Every route of the dialect lives under it (the app's body-size guard answers in OpenAI's shape there)."""

router = APIRouter(prefix=OPENAI_PREFIX, tags=["openai"], route_class=OpenAIRoute)

_ERRORS = {code: {"model": OpenAIErrorResponse, "description": text} for code, text in {
    400: "Invalid field (error.param names it)", 401: "Missing or invalid API key",
    403: "Key not allowed to use this model", 404: "Unknown or unserved model", 406: "Insufficient credits",
    429: "Rate limited or queue full", 502: "Backend unavailable", 504: "Timed out",
}.items()}


def _slugs(pipelines: tuple[str, ...]) -> list[str]:
    return sorted(slug for slug, spec in CATALOG.items() if spec.pipeline in pipelines)


async def _model(request: Request, caller, state, model: Any, pipelines: tuple[str, ...]) -> ModelSpec:
    """The slug ``model`` names, served and allowed for the caller, and of one of ``pipelines``."""
    fits = _slugs(pipelines)
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, f"'model' is required: one of {', '.join(fits)}", param="model")
    try:
        spec = await served_model(model, request, caller, state)
    except ApiError as exc:
        raise OpenAIError(exc.status_code, exc.message, param="model", headers=exc.headers) from None
    if spec.pipeline not in pipelines:
        raise OpenAIError(400, f"model {model!r} does not serve {request.url.path}; use one of {', '.join(fits)} "
                               f"(or POST /v1/{model} for its own parameters)", param="model",
                          code="model_not_supported")
    return spec


def _size(spec: ModelSpec, size: Any) -> tuple[int, int]:
    allowed = spec.resolutions()
    if size is None or size == "auto":
        return int(spec.param("img_width").default), int(spec.param("img_height").default)
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if match is None or (int(match[1]), int(match[2])) not in allowed:
        raise OpenAIError(400, f"size {size!r} is not offered by {spec.slug}; allowed: "
                               f"{', '.join(f'{w}x{h}' for w, h in allowed)} (or auto)", param="size")
    return int(match[1]), int(match[2])


def _count(spec: ModelSpec, n: Any) -> int:
    limit = spec.max_batch()
    try:
        count = 1 if n is None else int(n)
    except (TypeError, ValueError):
        count = 0
    if isinstance(n, bool) or isinstance(n, float) and not n.is_integer() or not 1 <= count <= limit:
        raise OpenAIError(400, f"n must be an integer from 1 to {limit} for {spec.slug}, got {n!r}", param="n")
    return count


def segmind_payload(spec: ModelSpec, fields: Mapping[str, Any], openai_fields: tuple[str, ...]) -> dict[str, Any]:
    """The ``/v1/<slug>`` body of an OpenAI request: its own fields translated, extensions passed on."""
    extensions = [name for name in spec.param_names if name not in _TRANSLATED]
    for name in fields:
        if name not in openai_fields and name not in extensions and name not in _IGNORED:
            raise OpenAIError(400, f"unknown parameter {name!r}; {spec.slug} accepts {', '.join(openai_fields)} "
                                   f"and the extension fields {', '.join(extensions)}", param=name,
                              code="unknown_parameter")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise OpenAIError(400, "'prompt' is required: a non-empty string", param="prompt")
    width, height = _size(spec, fields.get("size"))
    payload = {"prompt": prompt, "samples": _count(spec, fields.get("n")), "img_width": width,
               "img_height": height, "base64": False}
    return payload | {name: fields[name] for name in extensions if fields.get(name) is not None}


def _response_format(value: Any) -> str:
    if value is None:
        return "url"
    if value not in RESPONSE_FORMATS:
        raise OpenAIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {value!r}",
                          param="response_format")
    return value


async def _generate(request: Request, caller, state, spec: ModelSpec, payload: dict, response_format: str) -> Response:
    submission = await _prepare(spec, payload, caller, state, sync=True)
    try:
        outcome = await run_sync(request, state, submission)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if response_format == "b64_json":
        data = [OpenAIImage(b64_json=base64.b64encode(image).decode("ascii")) for image in outcome.outputs]
    else:
        data = [OpenAIImage(url=url) for url in output_urls(state.public_base(request), outcome.job)]
    body = ImagesResponse(created=int(time.time()), data=data)
    return JSONResponse(body.model_dump(exclude_none=True),
                        headers={"X-Request-Id": outcome.job.id, "X-Seed": str(outcome.job.seed)})


GENERATION_FIELDS = ("model", "prompt", "n", "size", "response_format")


@router.post("/generations", response_model=ImagesResponse, responses=_ERRORS,
             summary="OpenAI images: generate from a prompt (model: " + ", ".join(_slugs(GENERATION_PIPELINES)) + ")",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["model", "prompt"],
                 "properties": {
                     "model": {"type": "string", "enum": _slugs(GENERATION_PIPELINES)},
                     "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "default": 1},
                     "size": {"type": "string", "description": "WxH, one the model offers, or auto"},
                     "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "url"},
                     "seed": {"type": "integer", "description": "extension field (and every other parameter "
                                                               "of the model's /v1 route)"}}}}}}})
async def create_images(request: Request, caller: SubmitterDep, fields: JsonBodyDep, state: StateDep) -> Response:
    spec = await _model(request, caller, state, fields.get("model"), GENERATION_PIPELINES)
    response_format = _response_format(fields.get("response_format"))
    return await _generate(request, caller, state, spec, segmind_payload(spec, fields, GENERATION_FIELDS),
                           response_format)


EDIT_FIELDS = ("image", "model", "prompt", "n", "size", "response_format")


@router.post("/edits", response_model=ImagesResponse, responses=_ERRORS,
             summary="OpenAI images: edit an uploaded image (model: " + ", ".join(_slugs(EDIT_PIPELINES)) + ")",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["image", "prompt", "model"],
                 "properties": {
                     "image": {"type": "string", "format": "binary"},
                     "model": {"type": "string", "enum": _slugs(EDIT_PIPELINES)},
                     "prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1, "default": 1},
                     "size": {"type": "string"},
                     "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "url"},
                     "strength": {"type": "number", "description": "extension field"}}}}}}})
async def edit_images(request: Request, caller: SubmitterDep, state: StateDep) -> Response:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError(400, "send the edit as multipart/form-data with an 'image' file", param="image")
    async with request.form() as form:
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in fields:
                raise OpenAIError(400, f"{name!r} given more than once (one image per edit)", param=name)
            fields[name] = await value.read() if isinstance(value, UploadFile) else value
    if "mask" in fields:
        raise OpenAIError(400, "masks are not supported: the edit is image-to-image over the whole image",
                          param="mask")
    spec = await _model(request, caller, state, fields.get("model"), EDIT_PIPELINES)
    image = fields.get("image")
    if not isinstance(image, bytes) or not image:
        raise OpenAIError(400, "'image' is required: upload the image file to edit", param="image")
    response_format = _response_format(fields.get("response_format"))
    payload = segmind_payload(spec, {k: v for k, v in fields.items() if k != "image"}, EDIT_FIELDS)
    # The /v1 path decodes base64 images (format sniffed, bombs refused): hand it the upload so.
    payload["image"] = base64.b64encode(image).decode("ascii")
    return await _generate(request, caller, state, spec, payload, response_format)
