"""The demo's data: tiny artifacts of every slug, the ``models.toml`` naming them, and each seed
page's example request.

``diffserve demo``, ``serve --demo``, ``export --demo``, the benchmarks and the tests all take
their checkpoints and payloads from here, so they exercise one and the same set — and, because
the artifacts are written in their publishers' layouts and materialized by ``diffserve.engine.models_file``,
the same loading code as a real download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffserve.engine import home_dir
from diffserve.engine.catalog import CATALOG

DEMO_MODELS_FILE = "models.toml"
"""The demo's models file, written next to the tiny published artifacts it names."""


def write_demo_artifacts(root: str | Path) -> Path:
    """Tiny artifacts of every slug in their publishers' layouts under ``root``, and the ``models.toml``
    naming them (paths relative to it); returns the file.

    Each family writes its own (``ModelFamily.write_tiny``, under ``root/<family>``): SD an LDM single
    file (sd1.5-scifi) and diffusers folders; Omni-Zero the SDXL base, IP-Adapter, InstantID, ControlNets,
    antelopev2 and ZoeDepth ``.pt``; OminiControl the FLUX.1-schnell folder and the subject LoRA.
    """
    from diffserve.engine.models import FAMILIES

    root = Path(root)
    tables: dict[str, dict[str, Path]] = {}
    for family in FAMILIES.values():
        slugs = [slug for slug, spec in CATALOG.items() if spec.family is family]
        tables.update(family.write_tiny(root / family.name, slugs))
    lines = ["# The tiny demo models, written by diffserve.engine.tiny.demo in their publishers' layouts.\n"]
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
    from diffserve.engine.models_file import load_models_file, prepare

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


DEMO_PARAMS: dict[str, dict[str, Any]] = {slug: dict(spec.family.demo_params[slug]) for slug, spec in CATALOG.items()}
"""The seed pages' example payloads, as each family declares them (input images as local placeholders)."""


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
    from diffserve.engine.models import FAMILIES

    files = {"<local>": demo_input_image(inputs / "sd-img2img-input.jpeg")}
    for family in FAMILIES.values():
        files.update(family.write_demo_inputs(inputs))
    inline = {key: base64.b64encode(path.read_bytes()).decode() for key, path in files.items()}
    return {slug: {k: inline.get(v, v) if isinstance(v, str) else v for k, v in DEMO_PARAMS[slug].items()}
            for slug in CATALOG}
