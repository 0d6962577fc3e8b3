"""The model catalog: one typed definition per served slug, written once.

Every parameter of the five Segmind API pages (``shared/seeds/``) is declared here with its
type, default, range, allowed values and whether it is required, exactly as the pages state
them. The API validator, the pipelines, the Triton configs, the CLI and the docs all read this
module; nothing else restates a range or a default. ``ModelSpec.arguments`` maps each request
parameter onto its pipeline's ``generate`` keyword, so no pipeline restates the API's names.

Where a page is silent we add an implementation limit and say so in ``Param.note`` (for
example the largest seed torch accepts, or a cap on prompt length).
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

from diffserve.engine.models import OMINICONTROL, OMNI_ZERO, SD, ModelFamily
from diffserve.engine.schedulers import SCHEDULER_NAMES, UnknownSchedulerError, canonical_scheduler_name


class ParamType(str, Enum):
    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    IMAGE = "image"  # http(s) URL, base64 or data URI; fetched and decoded by the API


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType
    description: str
    required: bool = False
    default: Any = None
    """Value used when the client omits the field (``None``: no value)."""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    """Allowed values; for strings compared after ``normalize``."""
    normalize: Callable[[Any], Any] | None = None
    """Maps an accepted spelling to its canonical value (e.g. scheduler aliases)."""
    max_length: int | None = None
    """Implementation limit on string length (the pages state none)."""
    example: Any = None
    """Example value from the seed page where it is not applied as a default."""
    note: str = ""
    """What this implementation adds where the page is silent."""


@dataclass(frozen=True)
class ModelSpec:
    """One served slug's API contract: its parameters as the Segmind page states them, how a request
    maps onto the pipeline's arguments, and which model family (``diffserve.engine.models``) serves it."""

    slug: str
    title: str
    seed_document: str
    family: ModelFamily
    """The model family that serves this slug (``diffserve.engine.models``): its pipelines, published artifacts,
    tiny writer and benchmark constants."""
    pipeline: str
    """Which of the family's pipelines runs this slug (a key of ``ModelFamily.pipelines``)."""
    architecture: str
    """Checkpoint architecture the pipeline loads: ``sd15``, ``sdxl``, ``flux``."""
    params: tuple[Param, ...]
    batch_param: str | None
    """Name of the parameter holding the number of images per request (``None``: always one)."""
    output_format: str = "jpeg"
    """Image format returned when the request does not choose one."""
    description: str = ""
    output_size: tuple[int, int] | None = None
    """(width, height) of every output image where the page offers no size parameters (the pipeline's
    fixed size); read by the pipeline and by export shape profiles."""
    arguments: Mapping[str, str] = field(default_factory=dict, compare=False)
    """API parameter -> keyword argument of the pipeline's ``generate``; read by ``diffserve.engine.pipelines.run``.
    Every parameter is either here or one of ``RESPONSE_PARAMS``."""

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(names) != len(set(names)):
            raise ValueError(f"{self.slug}: duplicate parameter names")
        if self.batch_param is not None and self.batch_param not in names:
            raise ValueError(f"{self.slug}: batch_param {self.batch_param!r} is not a parameter")
        if set(self.arguments) - set(names):
            raise ValueError(f"{self.slug}: arguments for unknown parameters {sorted(set(self.arguments) - set(names))}")
        unmapped = set(names) - set(self.arguments) - set(RESPONSE_PARAMS)
        if unmapped:
            raise ValueError(f"{self.slug}: parameters {sorted(unmapped)} reach neither the pipeline nor the response")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.slug} has no parameter {name!r}")

    @property
    def image_params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.type is ParamType.IMAGE)

    def max_batch(self) -> int:
        return 1 if self.batch_param is None else int(self.param(self.batch_param).maximum or 1)

    def image_count(self, params: Mapping[str, Any]) -> int:
        """Images a request with these (validated) parameters produces, which is also its cost in credits."""
        return int(params.get(self.batch_param) or 1) if self.batch_param else 1

    def pipeline_arguments(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The ``generate`` keyword arguments of a validated request (image parameters decoded).

        A validated request carries every parameter; one left out takes its catalog default, except
        a required one, which is a ``KeyError``.
        """
        kwargs = {}
        for name, argument in self.arguments.items():
            if name in params:
                kwargs[argument] = params[name]
            elif self.param(name).required:
                raise KeyError(f"{self.slug}: the request has no {name!r}")
            else:
                kwargs[argument] = self.param(name).default
        return kwargs

    def resolutions(self) -> list[tuple[int, int]]:
        """Every (width, height) a request may ask for, for export shape profiles."""
        if "img_width" in self.param_names:
            widths = self.param("img_width").choices or (self.param("img_width").default,)
            heights = self.param("img_height").choices or (self.param("img_height").default,)
            return [(int(w), int(h)) for w in widths for h in heights]
        return [self.output_size] if self.output_size else []

    def validate(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Return the complete, typed parameter dict or raise ``ValidationError`` with every problem."""
        if not isinstance(payload, Mapping):
            raise ValidationError(self.slug, [f"request body must be a JSON object, got {type(payload).__name__}"])
        errors: list[str] = []
        unknown = sorted(set(payload) - set(self.param_names))
        if unknown:
            errors.append(
                f"unknown parameter(s) {', '.join(repr(u) for u in unknown)}; "
                f"{self.slug} accepts: {', '.join(self.param_names)}"
            )
        values: dict[str, Any] = {}
        for p in self.params:
            raw = payload.get(p.name)
            if raw is None:
                if p.required:
                    errors.append(f"'{p.name}' is required ({p.description.rstrip('.')})")
                values[p.name] = p.default
                continue
            try:
                values[p.name] = _check_value(p, raw)
            except ValueError as exc:
                errors.append(f"'{p.name}': {exc}")
        if errors:
            raise ValidationError(self.slug, errors)
        return values


class InvalidRequest(ValueError):
    """The request itself cannot be served (a client error: 400). Pipelines raise it for what
    the catalog cannot see (an image without a face, a strength that leaves no step); any other
    exception is a server-side failure."""


class ValidationError(InvalidRequest):
    """A request broke the catalog; ``errors`` holds one precise message per violation."""

    def __init__(self, slug: str, errors: list[str]):
        self.slug = slug
        self.errors = errors
        super().__init__("; ".join(errors))


class UnknownModelError(KeyError):
    def __init__(self, slug: str):
        self.slug = slug
        super().__init__(slug)

    def __str__(self) -> str:
        return f"unknown model {self.slug!r}; available: {', '.join(CATALOG)}"


def _check_value(p: Param, raw: Any) -> Any:
    value = _coerce(p, raw)
    if p.type in (ParamType.INTEGER, ParamType.NUMBER):
        if p.minimum is not None and value < p.minimum:
            raise ValueError(f"{_fmt(value)} is below the minimum {_fmt(p.minimum)} (range {_range(p)})")
        if p.maximum is not None and value > p.maximum:
            raise ValueError(f"{_fmt(value)} is above the maximum {_fmt(p.maximum)} (range {_range(p)})")
    if p.normalize is not None:
        value = p.normalize(value)
    if p.choices is not None and value not in p.choices:
        raise ValueError(f"{value!r} is not allowed; allowed values: {', '.join(map(repr, p.choices))}")
    if p.max_length is not None and isinstance(value, str) and len(value) > p.max_length:
        raise ValueError(f"is {len(value)} characters long; the limit is {p.max_length}")
    return value


def _coerce(p: Param, raw: Any) -> Any:
    """Convert a JSON value to the parameter's type; numbers sent as strings are accepted (old SDKs)."""
    kind = p.type
    if kind in (ParamType.STRING, ParamType.IMAGE):
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {_json_type(raw)}")
        if kind is ParamType.IMAGE and not raw.strip():
            raise ValueError("expected an image URL, base64 data or data URI, got an empty string")
        return raw
    if kind is ParamType.BOOLEAN:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in _BOOL_STRINGS:
            return _BOOL_STRINGS[raw.strip().lower()]
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if isinstance(raw, bool):
        raise ValueError(f"expected {_article(kind.value)}, got a boolean")
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = int(text) if kind is ParamType.INTEGER and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"expected {_article(kind.value)}, got the string {raw!r}") from None
    if not isinstance(raw, (int, float)):
        raise ValueError(f"expected {_article(kind.value)}, got {_json_type(raw)}")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"expected a finite {kind.value}, got {raw!r}")
    if kind is ParamType.INTEGER:
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError(f"expected an integer, got {raw!r}")
            raw = int(raw)
        return int(raw)
    return float(raw)


_BOOL_STRINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _range(p: Param) -> str:
    return f"{_fmt(p.minimum) if p.minimum is not None else '-inf'} - {_fmt(p.maximum) if p.maximum is not None else 'inf'}"


def _scheduler_name(value: str) -> str:
    try:
        return canonical_scheduler_name(value)
    except UnknownSchedulerError as exc:
        raise ValueError(str(exc)) from None


# Largest seed torch.Generator.manual_seed accepts is 2**64-1; JSON clients and SQLite handle
# signed 64-bit integers safely, so that is the bound where a page gives none.
MAX_SEED = 2**63 - 1
PROMPT_MAX_LENGTH = 10_000
_LIMIT_NOTE = "implementation limit; the Segmind page states none"


RESPONSE_PARAMS = ("base64", "image_format", "image_quality")
"""Parameters that shape the response (encoding, format, quality), applied by the API, never by a pipeline."""

# The keyword arguments of ``diffserve.engine.models.sd.txt2img.generate``, shared by img2img.
_SD_ARGUMENTS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "img_width": "width", "img_height": "height",
    "num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale", "samples": "num_images",
    "seed": "seed", "scheduler": "scheduler",
}


def resolve_seed(seed: int, maximum: int = 2**32 - 1) -> int:
    """``-1`` means "draw one"; the drawn seed is reported back to the client."""
    return secrets.randbelow(maximum + 1) if seed == -1 else seed


def _prompt(required: bool, default: str | None = None, description: str = "Prompt to render") -> Param:
    return Param("prompt", ParamType.STRING, description, required=required, default=default,
                 max_length=PROMPT_MAX_LENGTH, note=f"max length: {_LIMIT_NOTE}")


def _negative_prompt(default: str | None = None, description: str | None = None) -> Param:
    return Param(
        "negative_prompt", ParamType.STRING,
        description or "Prompts to exclude, eg. 'bad anatomy, bad hands, missing fingers'",
        default=default, max_length=PROMPT_MAX_LENGTH, note=f"max length: {_LIMIT_NOTE}",
    )


def _scheduler(default: str) -> Param:
    return Param("scheduler", ParamType.STRING, "Type of scheduler.", default=default,
                 choices=SCHEDULER_NAMES, normalize=_scheduler_name,
                 note="case-insensitive aliases such as 'euler_a' or 'ddim' are accepted")


def _samples() -> Param:
    return Param("samples", ParamType.INTEGER, "Number of samples to generate.", default=1, minimum=1, maximum=4)


def _steps(default: int) -> Param:
    return Param("num_inference_steps", ParamType.INTEGER, "Number of denoising steps.",
                 default=default, minimum=20, maximum=100)


def _base64(default: bool = False) -> Param:
    return Param("base64", ParamType.BOOLEAN, "Base64 encoding of the output image.", default=default)


def _seed(default: int, maximum: int | None = None, description: str = "Seed for image generation.") -> Param:
    return Param("seed", ParamType.INTEGER, description, default=default, minimum=-1,
                 maximum=MAX_SEED if maximum is None else maximum,
                 note="-1 draws a random seed, reported back" + ("" if maximum else f"; maximum: {_LIMIT_NOTE}"))


SD15_SCIFI = ModelSpec(
    slug="sd1.5-scifi",
    title="Scifi",
    seed_document="004_334d4105feb30352.txt",
    family=SD,
    pipeline="txt2img",
    architecture="sd15",
    batch_param="samples",
    arguments=_SD_ARGUMENTS,
    description="Photorealistic SD1.5 fine-tune; text-to-image with classifier-free guidance.",
    params=(
        _prompt(required=True),
        _base64(),
        Param("guidance_scale", ParamType.NUMBER, "Scale for classifier-free guidance", default=7.5,
              minimum=0.1, maximum=25),
        Param("img_height", ParamType.INTEGER, "Height of the Image", default=512, choices=(512, 768, 1024)),
        Param("img_width", ParamType.INTEGER, "Width of the image.", default=512, choices=(512, 768, 1024)),
        _negative_prompt(),
        _steps(20),
        _samples(),
        _scheduler("UniPC"),
        _seed(-1),
    ),
)

SD15_IMG2IMG = ModelSpec(
    slug="sd1.5-img2img",
    title="Stable Diffusion img2img",
    seed_document="001_3a5c22b129d5eb5f.txt",
    family=SD,
    pipeline="sd15_img2img",
    architecture="sd15",
    batch_param="samples",
    arguments=_SD_ARGUMENTS | {"image": "image", "strength": "strength"},
    description="SDEdit image-to-image on SD1.5: the input image is noised to `strength` and denoised.",
    params=(
        Param("image", ParamType.IMAGE, "Input Image.", required=True, example="/sd-img2img-input.jpeg",
              note="resized to img_width x img_height before encoding"),
        _prompt(required=True),
        _base64(),
        Param("guidance_scale", ParamType.NUMBER, "Scale for classifier-free guidance", default=7.5,
              minimum=0.1, maximum=25),
        Param("img_height", ParamType.INTEGER, "Image resolution.", default=512, choices=(512, 768)),
        Param("img_width", ParamType.INTEGER, "Image resolution.", default=512, choices=(512, 768)),
        _negative_prompt(),
        _steps(20),
        _samples(),
        _scheduler("DDIM"),
        _seed(-1),
        Param("strength", ParamType.NUMBER, "How much to transform the reference image", default=1,
              minimum=0.1, maximum=1),
    ),
)

SEGMIND_VEGA = ModelSpec(
    slug="segmind-vega",
    title="Segmind-Vega",
    seed_document="003_ebc2898775efb629.txt",
    family=SD,
    pipeline="txt2img",
    architecture="sdxl",
    batch_param="samples",
    arguments=_SD_ARGUMENTS,
    description="Distilled SDXL (745M-parameter UNet); text-to-image at 1024x1024.",
    params=(
        _prompt(required=True),
        _base64(),
        Param("guidance_scale", ParamType.NUMBER, "Scale for classifier-free guidance", default=7.5,
              minimum=1, maximum=25),
        Param("img_height", ParamType.INTEGER, "Can only be 1024 for SDXL", default=1024, choices=(1024,)),
        Param("img_width", ParamType.INTEGER, "Can only be 1024 for SDXL", default=1024, choices=(1024,)),
        _negative_prompt(),
        _steps(25),
        _samples(),
        _scheduler("DPM2 Karras"),
        _seed(-1, maximum=999_999_999_999_999),
    ),
)

_OMNI_URL = "https://segmind-sd-models.s3.amazonaws.com/display_images/omni-zero-{}.jpg"
_OMNI_EXAMPLE_NOTE = ("the page's default URL is kept as the example; the documented fallback rules "
                      "(missing composition -> base image, missing base -> composition) apply instead")


def _strength(name: str, description: str, default: float) -> Param:
    return Param(name, ParamType.NUMBER, description, default=default, minimum=0, maximum=1)


OMNI_ZERO = ModelSpec(
    slug="omni-zero",
    title="Omni Zero",
    seed_document="000_854337d1223b1b8a.txt",
    family=OMNI_ZERO,
    pipeline="omni_zero",
    architecture="sdxl",
    batch_param="number_of_images",
    arguments={
        **{name: name for name in (
            "identity_image", "style_image", "base_image", "composition_image", "depth_image", "prompt",
            "negative_prompt", "guidance_scale", "base_image_strength", "composition_image_strength",
            "style_image_strength", "identity_image_strength", "depth_image_strength", "seed")},
        "number_of_images": "num_images", "number_of_steps": "num_steps",
    },
    description="Zero-shot stylized portraits: SDXL ControlNet img2img with identity, style and composition adapters.",
    params=(
        Param("identity_image", ParamType.IMAGE, "Identity image for the model", required=True,
              example=_OMNI_URL.format("identity")),
        Param("style_image", ParamType.IMAGE, "Style image for the model", required=True,
              example=_OMNI_URL.format("style")),
        Param("base_image", ParamType.IMAGE, "Base image for the model", example=_OMNI_URL.format("base"),
              note=_OMNI_EXAMPLE_NOTE),
        _strength("base_image_strength", "Base image strength for the model", 0.15),
        Param("composition_image", ParamType.IMAGE, "Composition image for the model",
              example=_OMNI_URL.format("base"), note=_OMNI_EXAMPLE_NOTE),
        _strength("composition_image_strength", "Composition image strength for the model", 1),
        Param("depth_image", ParamType.IMAGE, "Depth image for the model", default=None),
        _strength("depth_image_strength", "Depth image strength for the model, if not supplied the composition "
                  "image will be used for depth", 0.5),
        Param("guidance_scale", ParamType.NUMBER, "Guidance scale for the model", default=3, minimum=0, maximum=14),
        _strength("identity_image_strength", "Identity image strength for the model", 1),
        _negative_prompt(default="blurry, out of focus", description="Negative prompt for the model"),
        Param("number_of_images", ParamType.INTEGER, "Number of images to generate", default=1, minimum=1, maximum=4),
        Param("number_of_steps", ParamType.INTEGER, "Number of steps for the model", default=10, minimum=1, maximum=50),
        _prompt(required=False, default="A person", description="Prompt for the model"),
        _seed(42, description="Random seed for the model"),
        _strength("style_image_strength", "Style image strength for the model", 1),
    ),
)

OMINICONTROL = ModelSpec(
    slug="ominicontrol",
    title="OminiControl",
    seed_document="002_39985c154ef1b632.txt",
    family=OMINICONTROL,
    pipeline="ominicontrol",
    architecture="flux",
    batch_param=None,
    arguments={"image": "image", "prompt": "prompt", "steps": "num_inference_steps", "seed": "seed"},
    output_format="png",
    description="Subject-driven generation on FLUX.1-schnell with condition tokens and a subject LoRA.",
    # The page has no size parameters; 512x512 is the OminiControl subject model's training and demo size.
    output_size=(512, 512),
    params=(
        Param("image", ParamType.IMAGE, "URL of the input image.", required=True),
        _prompt(required=True, description="Prompt for the image generation."),
        Param("steps", ParamType.INTEGER, "Number of inference steps for image generation.", default=8,
              minimum=4, maximum=40),
        _seed(12467, description="Random seed for generation"),
        Param("image_format", ParamType.STRING, "Output image format", default="png",
              choices=("png", "jpeg", "webp"), normalize=lambda v: v.strip().lower()),
        Param("image_quality", ParamType.INTEGER, "Image quality setting for output", default=95,
              minimum=10, maximum=100),
        _base64(default=True),
    ),
)

CATALOG: dict[str, ModelSpec] = {m.slug: m for m in (SD15_SCIFI, SD15_IMG2IMG, SEGMIND_VEGA, OMNI_ZERO, OMINICONTROL)}


def get_model(slug: str) -> ModelSpec:
    try:
        return CATALOG[slug]
    except KeyError:
        raise UnknownModelError(slug) from None




def validate(slug: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    return get_model(slug).validate(payload)


def read_params_argument(text: str | None) -> dict[str, Any]:
    """The request JSON of a ``--params`` command-line argument: inline JSON or ``@file.json``.

    Empty or None is ``{}``. Raises ``ValueError`` naming ``--params`` (unreadable file, bad JSON,
    not an object); the command lines report it and exit with status 2.
    """
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--params file cannot be read: {exc}") from None
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError("--params must be a JSON object")
    return params
