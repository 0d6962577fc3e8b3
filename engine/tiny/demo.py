"""The demo's data: tiny artifacts of every slug, the ``models.toml`` naming them, and each seed
page's example request.

``diffserve demo``, ``serve --demo``, ``export --demo``, the benchmarks and the tests all take
their checkpoints and payloads from here, so they exercise one and the same set — and, because
the artifacts are written in their publishers' layouts and materialized by ``engine.models_file``,
the same loading code as a real download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import home_dir
from engine.catalog import CATALOG
from engine.tiny.omni_zero import write_demo_inputs

DEMO_MODELS_FILE = "models.toml"
"""The demo's models file, written next to the tiny published artifacts it names."""


def write_demo_artifacts(root: str | Path) -> Path:
    """Tiny artifacts of every slug in their publishers' layouts under ``root``, and the ``models.toml``
    naming them (paths relative to it); returns the file.

    SD slugs: ``engine.published.sd.write_tiny`` (sd1.5-scifi an LDM single file, sd1.5-img2img and
    segmind-vega diffusers folders as published); omni-zero and ominicontrol: ``engine.published.omni_zero``
    and ``engine.published.ominicontrol`` (SDXL base, IP-Adapter, InstantID, ControlNets, antelopev2,
    ZoeDepth ``.pt``; FLUX.1-schnell folder and the OminiControl LoRA).
    """
    from engine.models_file import slug_module
    from engine.published import sd

    root = Path(root)
    tables: dict[str, dict[str, Path]] = {slug: {"checkpoint": p} for slug, p in sd.write_tiny(root / "sd").items()}
    for slug in ("omni-zero", "ominicontrol"):
        tables[slug] = dict(slug_module(slug).write_tiny(root / slug))
    lines = ["# The tiny demo models, written by engine.tiny.demo in their publishers' layouts.\n"]
    for slug in CATALOG:
        lines.append(f'["{slug}"]')
        lines += [f'{role} = "{Path(path).relative_to(root).as_posix()}"' for role, path in tables[slug].items()]
        lines.append("")
    path = root / DEMO_MODELS_FILE
    text = "\n".join(lines)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def build_demo_checkpoints(root: str | Path) -> dict[str, Path]:
    """Tiny checkpoints for every slug: ``{slug: engine checkpoint dir}``, materialized from the demo's
    ``models.toml`` (``root/published/``) into ``root/materialized/`` by the same code a real download goes
    through."""
    from engine.models_file import load_models_file, prepare

    root = Path(root)
    prepared = prepare(load_models_file(write_demo_artifacts(root / "published")), root / "materialized")
    broken = prepared.unavailable()
    if broken:
        raise RuntimeError("the tiny demo artifacts fail their checks: " + "; ".join(sum(broken.values(), [])))
    return prepared.checkpoints


def demo_models_file() -> Path:
    """The demo's ``models.toml`` under ``DIFFSERVE_HOME`` (artifacts written on first use)."""
    return write_demo_artifacts(home_dir() / "checkpoints" / "published")


def demo_checkpoints() -> dict[str, Path]:
    """The demo checkpoints under ``DIFFSERVE_HOME`` (built on first use, cached)."""
    return build_demo_checkpoints(home_dir() / "checkpoints")


DEMO_PARAMS: dict[str, dict[str, Any]] = {
    # The seed pages' example payloads, with the example input image replaced by a local one.
    "sd1.5-scifi": {
        "prompt": "futuristic sci-fi high-tech city of Atlantis in late afternoon light, wispy clouds in a blue sky",
        "negative_prompt": "blurry, blurred, amateur, ugly, low quality, sketch, low resolution, warped, crooked, "
                           "deformed, cartoony, low detail",
        "scheduler": "dpmpp_2m", "num_inference_steps": 30, "guidance_scale": 5, "samples": 1,
        "seed": 516797155652, "img_width": 512, "img_height": 768, "base64": False,
    },
    "sd1.5-img2img": {
        "image": "<local>", "samples": 1, "prompt": "A fantasy landscape, trending on artstation, mystical sky",
        "negative_prompt": "nude, disfigured, blurry", "scheduler": "DDIM", "num_inference_steps": 25,
        "guidance_scale": 10.5, "strength": 0.75, "seed": 98877465625, "img_width": 512, "img_height": 512,
        "base64": False,
    },
    "segmind-vega": {
        "prompt": "cinematic photo detailed closeup portrait of a Beautiful cyberpunk woman, robotic parts, cables, "
                  "lights, high quality photography, 3 point lighting, flash with softbox, 4k",
        "negative_prompt": "(worst quality, low quality)", "samples": 1, "scheduler": "UniPC",
        "num_inference_steps": 25, "guidance_scale": 9, "seed": 1232788698, "img_width": 1024,
        "img_height": 1024, "base64": False,
    },
}

DEMO_PARAMS["ominicontrol"] = {
    "image": "<local>", "prompt": "photo of this orange sofa in a modern living room", "steps": 8,
    "seed": 4710825087, "image_format": "png", "image_quality": 90, "base64": False,
}

# The seed page's example payload; its image URLs become the tiny demo portraits (see cmd_demo).
DEMO_PARAMS["omni-zero"] = {
    "seed": 42, "prompt": "A person", "base_image": "<omni-base>", "style_image": "<omni-style>",
    "guidance_scale": 3, "identity_image": "<omni-identity>", "negative_prompt": "blurry, out of focus",
    "number_of_steps": 10, "number_of_images": 1, "composition_image": "<omni-base>", "base_image_strength": 0.15,
    "depth_image_strength": 0.5, "style_image_strength": 1, "identity_image_strength": 1,
    "composition_image_strength": 1,
}


def demo_input_image(path: Path) -> Path:
    """A deterministic 512x512 test picture (gradient sky over a checkerboard), for img2img demos."""
    import numpy as np
    import PIL.Image

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:512, 0:512]
        sky = np.stack([x / 2, y / 3 + 60, 255 - y / 4], axis=-1)
        board = ((x // 64 + y // 64) % 2)[..., None] * np.array([90, 60, 30])
        pixels = np.where((y > 300)[..., None], board + 80, sky).clip(0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(path, format="JPEG", quality=92)
    return path


def demo_payloads() -> dict[str, dict[str, Any]]:
    """The seed examples of every slug, input images inlined as base64."""
    import base64


    inputs = home_dir() / "demo-inputs"
    files = {"<local>": demo_input_image(inputs / "sd-img2img-input.jpeg"),
             **{f"<omni-{k}>": v for k, v in write_demo_inputs(inputs).items()}}
    inline = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
    return {slug: {k: inline.get(v, v) if isinstance(v, str) else v for k, v in DEMO_PARAMS[slug].items()}
            for slug in CATALOG}
