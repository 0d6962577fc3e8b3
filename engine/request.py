"""One generation request after validation, and its wire form between a client and a pipeline model.

The API validates a request once against the catalog (``diffserve.engine.catalog.validate``) and decodes
its images; ``GenerationRequest`` carries the result: the slug, the complete validated parameters
without the image ones, and the images as uint8 [H, W, 3] arrays. ``encode`` gives what a Triton
pipeline model takes (``REQUEST``: JSON ``{"slug", "params"}``; one UINT8 tensor per image,
named after its parameter) and ``decode`` rebuilds the request inside the model. Decoding trusts
the values (ranges, choices) and refuses only what cannot be a validated request: undecodable
JSON, another slug, parameter names that are unknown or missing, images of the wrong form. Those
refusals raise ``MalformedRequest``, an ``InvalidRequest`` (a client error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffserve.engine.catalog import InvalidRequest, get_model

REQUEST_TENSOR = "REQUEST"
"""Name of the pipeline model's JSON input."""


class MalformedRequest(InvalidRequest):
    """The bytes or tensors cannot be a validated request of this slug."""


def check_image(name: str, image: Any) -> np.ndarray:
    """``image`` as a C-contiguous uint8 [H, W, 3] array with H, W > 0, or ``MalformedRequest``."""
    if not isinstance(image, np.ndarray):
        raise MalformedRequest(f"'{name}' must be a uint8 [H, W, 3] array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape[:2]:
        raise MalformedRequest(f"'{name}' must be a uint8 [H, W, 3] array with H, W > 0, "
                               f"got {image.dtype} {list(image.shape)}")
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class GenerationRequest:
    slug: str
    params: Mapping[str, Any]
    """Every non-image catalog parameter of the slug, validated (defaults filled in)."""
    images: Mapping[str, np.ndarray] = field(default_factory=dict)
    """The image parameters the request gives, uint8 [H, W, 3]; absent ones are left out."""

    def __post_init__(self) -> None:
        spec = get_model(self.slug)
        expected = set(spec.param_names) - set(spec.image_params)
        unknown = sorted(set(self.params) - expected)
        missing = sorted(expected - set(self.params))
        if unknown:
            raise MalformedRequest(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {self.slug}")
        if missing:
            raise MalformedRequest(f"missing parameter(s) {', '.join(map(repr, missing))} for {self.slug} "
                                   "(a request carries every validated parameter)")
        bad = sorted(set(self.images) - set(spec.image_params))
        if bad:
            raise MalformedRequest(f"{self.slug} has no image parameter(s) {', '.join(map(repr, bad))}")
        object.__setattr__(self, "images", {n: check_image(n, im) for n, im in self.images.items()})

    @classmethod
    def from_params(cls, slug: str, params: Mapping[str, Any]) -> GenerationRequest:
        """From validated parameters whose image values are decoded arrays (or ``None``)."""
        image_params = get_model(slug).image_params
        return cls(slug, {k: v for k, v in params.items() if k not in image_params},
                   {k: params[k] for k in image_params if params.get(k) is not None})

    def pipeline_params(self) -> dict[str, Any]:
        """What ``diffserve.engine.pipelines.run`` takes: the parameters plus every image parameter (``None`` when absent)."""
        return {**self.params, **{n: self.images.get(n) for n in get_model(self.slug).image_params}}

    def encode(self) -> tuple[bytes, dict[str, np.ndarray]]:
        """The ``REQUEST`` bytes and the image tensors by name."""
        return json.dumps({"slug": self.slug, "params": dict(self.params)}).encode(), dict(self.images)

    @classmethod
    def decode(cls, slug: str, payload: bytes | str | None, images: Mapping[str, np.ndarray]) -> GenerationRequest:
        """The request a pipeline model of ``slug`` received; ``MalformedRequest`` if it cannot be one."""
        if payload is None:
            raise MalformedRequest(f"missing {REQUEST_TENSOR} input")
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedRequest(f"{REQUEST_TENSOR} is not JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("params"), dict):
            raise MalformedRequest(f'{REQUEST_TENSOR} must be a JSON object {{"slug": ..., "params": {{...}}}}')
        if body.get("slug") != slug:
            raise MalformedRequest(f"the request is for {body.get('slug')!r}, this model serves {slug!r}")
        return cls(slug, body["params"], images)
