"""The Omni-Zero checkpoint layout: an SDXL diffusers directory plus the parts Omni-Zero adds.

```
<checkpoint>/                 SDXL base (model_index.json, unet/, vae/, text encoders, tokenizers, scheduler/)
  image_encoder/              CLIPVisionModelWithProjection (IP-Adapter's ViT-H/14 image encoder)
  controlnet_identity/        ControlNetModel: InstantID's IdentityNet (face keypoints)
  controlnet_depth/           ControlNetModel: depth (ZoeDepth maps)
  ip_adapter/                 *instantid*.bin|.safetensors  (InstantID face adapter, 512-d face embedding)
                              *plus*.bin|.safetensors       (IP-Adapter Plus SDXL ViT-H; used twice: style, composition)
  face_analysis/              insightface model pack (antelopev2: SCRFD detector + ArcFace recognizer, ONNX)
  depth_estimator/            transformers depth model + preprocessor_config.json (ZoeDepth)
```

Real deployments copy or link the released files into these places under their release names;
the tiny test checkpoints (``diffserve.engine.models.omni_zero.tiny``) use the same layout. This module reads
only configs and tensor shapes (no network is built), so ``read_architecture`` stays cheap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

IMAGE_ENCODER_DIR = "image_encoder"
CONTROLNET_IDENTITY_DIR = "controlnet_identity"
CONTROLNET_DEPTH_DIR = "controlnet_depth"
IP_ADAPTER_DIR = "ip_adapter"
FACE_ANALYSIS_DIR = "face_analysis"
DEPTH_ESTIMATOR_DIR = "depth_estimator"
OMNI_ZERO_DIRS = (IMAGE_ENCODER_DIR, CONTROLNET_IDENTITY_DIR, CONTROLNET_DEPTH_DIR, IP_ADAPTER_DIR,
                  FACE_ANALYSIS_DIR, DEPTH_ESTIMATOR_DIR)

OMNI_ZERO_COMPONENTS = ("image_encoder", "ip_projection", "controlnet_unet", "face_detector", "face_recognizer",
                        "depth_estimator")
"""Components Omni-Zero adds to an SDXL checkpoint's text encoders and VAE."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin")

MAX_IMAGE_SIDE = 1024
"""Every input image is resized to fit this square keeping its aspect ratio (the reference's rule)."""
SIZE_MULTIPLE = 8
MIN_IMAGE_SIDE = 64
"""Implementation floor: a side shorter than this after fitting (aspect ratio beyond 16:1) is refused."""
FACE_EMBEDDING_DIM = 512

ZOEDEPTH_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_pad": True, "keep_aspect_ratio": True, "ensure_multiple_of": 32, "size": {"height": 384, "width": 512},
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
"""ZoeDepth's own inference settings (isl-org ZoeDepth ``config_zoedepth.json`` ``img_size`` [384, 512],
``PrepForMidas``: keep aspect ratio, multiples of 32, normalise with 0.5/0.5; reflection padding in
``infer``), which ``ZoeDepthImageProcessor`` documents as its defaults."""


def fit_size(width: int, height: int, max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """The reference's ``load_and_resize_image``: fit ``max_side`` keeping aspect, round down to multiples of 8.

    The image is scaled up as well as down, so its long side becomes ``max_side``.
    """
    aspect = width / height
    if width / max_side > height / max_side:
        new_w, new_h = max_side, int(max_side / aspect)
    else:
        new_w, new_h = int(max_side * aspect), max_side
    return new_w // SIZE_MULTIPLE * SIZE_MULTIPLE, new_h // SIZE_MULTIPLE * SIZE_MULTIPLE


def depth_padding(height: int, width: int, processor: dict[str, Any]) -> tuple[int, int]:
    """ZoeDepth's reflection padding (rows, columns) on each side: int(sqrt(side / 2) * 3)."""
    if not processor.get("do_pad", False):
        return 0, 0
    return int((height / 2) ** 0.5 * 3), int((width / 2) ** 0.5 * 3)


def depth_input_size(height: int, width: int, processor: dict[str, Any]) -> tuple[int, int]:
    """(height, width) the depth estimator sees for an image of this size (DPT/ZoeDepth resize rule).

    The processor's target size is reached by scaling both sides by the factor closest to one
    when ``keep_aspect_ratio``; each side is then rounded to a multiple of ``ensure_multiple_of``.
    """
    size = processor.get("size") or {"height": 384, "width": 512}
    target_h, target_w = int(size["height"]), int(size["width"])
    scale_h, scale_w = target_h / height, target_w / width
    if processor.get("keep_aspect_ratio", True):
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    multiple = int(processor.get("ensure_multiple_of", 32) or 1)
    multiple = max(multiple, 1)

    def constrain(value: float) -> int:
        out = round(value / multiple) * multiple
        return max(out, multiple)

    return constrain(scale_h * height), constrain(scale_w * width)


@dataclass(frozen=True)
class OmniZeroConfig:
    """Facts of an Omni-Zero checkpoint's extra parts, for pipelines and descriptors."""

    image_size: int
    """Side of the CLIP image encoder's square input."""
    image_tokens: int
    """Patch tokens + class token of the image encoder."""
    image_hidden_size: int
    face_embedding_dim: int
    """Width of the recognition embedding the face adapter projects (512 for ArcFace)."""
    identity_tokens: int
    """Tokens of the face adapter's resampler (16)."""
    image_prompt_tokens: int
    """Tokens of the IP-Adapter Plus resampler (16)."""
    depth_processor: dict[str, Any] = field(default_factory=dict)
    """``depth_estimator/preprocessor_config.json``: input size, normalisation, padding."""
    depth_model_type: str = "zoedepth"
    """``zoedepth`` predicts metric depth (far is large); other estimators predict relative inverse depth."""


def is_omni_zero_checkpoint(checkpoint: str | Path) -> bool:
    root = Path(checkpoint)
    return all((root / d).is_dir() for d in OMNI_ZERO_DIRS)


@dataclass(frozen=True)
class IPAdapterFiles:
    identity: Path
    """InstantID face adapter."""
    image_prompt: Path
    """IP-Adapter Plus (style and composition)."""


INSTANTID_PUBLISHED_NAME = "ip-adapter.bin"
"""InstantX/InstantID publishes its face adapter under this plain name."""


def find_ip_adapters(checkpoint: str | Path) -> IPAdapterFiles:
    """The face adapter and the Plus adapter (file name contains ``plus``) in ``ip_adapter/``.

    The face adapter is InstantID's ``ip-adapter.bin`` as published, or any file whose name
    contains ``instantid``.
    """
    directory = Path(checkpoint) / IP_ADAPTER_DIR
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if directory.is_dir() else []

    def pick(word: str) -> Path:
        matches = [p for p in files if word in p.name.lower()
                   or (word == "instantid" and p.name == INSTANTID_PUBLISHED_NAME)]
        if len(matches) != 1:
            raise FileNotFoundError(
                f"{directory}: expected exactly one adapter file whose name contains {word!r} "
                f"(InstantID's ip-adapter.bin, ip-adapter-plus_sdxl_vit-h.safetensors), found "
                f"{', '.join(p.name for p in matches) or 'none'}")
        return matches[0]

    return IPAdapterFiles(identity=pick("instantid"), image_prompt=pick("plus"))


def read_ip_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter file as ``{"image_proj": {...}, "ip_adapter": {...}}``.

    ``.bin`` files hold that nested dict (torch.save); ``.safetensors`` files hold flat keys
    prefixed ``image_proj.`` and ``ip_adapter.``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            prefix, _, rest = key.partition(".")
            if prefix not in out:
                raise ValueError(f"{path}: unexpected key {key!r} (expected image_proj.* or ip_adapter.*)")
            out[prefix][rest] = value
        return out
    try:  # memory-mapped: reading a shape does not read a 1.7 GB file
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (pre-zip) torch.save format cannot be memory-mapped
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if set(state) != {"image_proj", "ip_adapter"}:
        raise ValueError(f"{path}: expected the keys 'image_proj' and 'ip_adapter', got {sorted(state)}")
    return state


def _tensor_shape(path: Path, section: str, name: str) -> tuple[int, ...]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice(f"{section}.{name}").get_shape())
    return tuple(read_ip_adapter(path)[section][name].shape)


def read_omni_zero_config(checkpoint: str | Path) -> OmniZeroConfig | None:
    """The Omni-Zero facts of ``checkpoint``, or None for a checkpoint without the Omni-Zero parts."""
    root = Path(checkpoint)
    if not is_omni_zero_checkpoint(root):
        return None
    vision = json.loads((root / IMAGE_ENCODER_DIR / "config.json").read_text(encoding="utf-8"))
    vision = vision.get("vision_config", vision)
    adapters = find_ip_adapters(root)
    depth_dir = root / DEPTH_ESTIMATOR_DIR
    processor_path = depth_dir / "preprocessor_config.json"
    depth_config = json.loads((depth_dir / "config.json").read_text(encoding="utf-8"))
    if processor_path.is_file():
        processor = json.loads(processor_path.read_text(encoding="utf-8"))
    elif depth_config.get("model_type", "zoedepth") == "zoedepth":
        # Without its preprocessor config a ZoeDepth model still pads, resizes and normalises as
        # it was trained to: silently skipping the padding would change every depth map.
        logger.warning("%s has no preprocessor_config.json; using ZoeDepth's documented defaults %s",
                       depth_dir, ZOEDEPTH_PROCESSOR_DEFAULTS)
        processor = dict(ZOEDEPTH_PROCESSOR_DEFAULTS)
    else:
        processor = {}
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    return OmniZeroConfig(
        image_size=size,
        image_tokens=(size // patch) ** 2 + 1,
        image_hidden_size=int(vision["hidden_size"]),
        face_embedding_dim=_tensor_shape(adapters.identity, "image_proj", "proj_in.weight")[1],
        identity_tokens=_tensor_shape(adapters.identity, "image_proj", "latents")[1],
        image_prompt_tokens=_tensor_shape(adapters.image_prompt, "image_proj", "latents")[1],
        depth_processor=processor,
        depth_model_type=str(depth_config.get("model_type", "zoedepth")),
    )
