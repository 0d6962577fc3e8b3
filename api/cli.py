"""The ``diffserve`` command line: generate, demo (and, as they land, export, triton, serve, bench).

Each sub-command imports what it needs only when it runs, so ``diffserve --help`` is instant
and the engine-only commands never load the API or Triton modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("diffserve")


def home_dir() -> Path:
    """Where demo checkpoints, repositories and outputs live (``DIFFSERVE_HOME``, default ./var)."""
    return Path(os.environ.get("DIFFSERVE_HOME", "var")).resolve()


def demo_checkpoints() -> dict[str, Path]:
    from engine.tiny import build_demo_checkpoints

    return build_demo_checkpoints(home_dir() / "checkpoints")


def _parse_params(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--params is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise SystemExit("--params must be a JSON object")
    return params


def load_local_images(spec, params: dict[str, Any]) -> dict[str, Any]:
    """Replace image parameters holding a local path, URL, base64 or data URI by decoded RGB images."""
    import asyncio

    import PIL.Image

    out = dict(params)
    for name in spec.image_params:
        value = out.get(name)
        if value is None:
            continue
        path = Path(value)
        if len(value) < 4096 and path.is_file():
            with PIL.Image.open(path) as im:
                out[name] = im.convert("RGB")
        else:
            from api.images import ImageFetchPolicy, load_image

            out[name] = asyncio.run(load_image(value, name, ImageFetchPolicy()))
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.catalog import ValidationError, get_model
    from engine.imageio import EXTENSIONS, encode_image
    from engine.pipelines import RunControl, run
    from engine.runtime_torch import TorchComponents

    spec = get_model(args.slug)
    try:
        params = spec.validate(_parse_params(args.params))
    except ValidationError as exc:
        print("invalid parameters:\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 2
    if not spec.implemented:
        print(f"{args.slug} is not implemented yet", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint) if args.checkpoint else demo_checkpoints()[args.slug]
    components = TorchComponents(checkpoint, device=args.device, precision=args.precision)
    params = load_local_images(spec, params)
    bar = tqdm(total=None, desc=args.slug, unit="step")

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = run(args.slug, params, components, RunControl(on_step=on_step))
    bar.close()
    fmt = params.get("image_format") or spec.output_format
    quality = params.get("image_quality", 95)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(result.to_uint8()):
        path = out / f"{args.slug}-{result.seed}-{i}.{EXTENSIONS[fmt]}"
        path.write_bytes(encode_image(pixels, fmt, quality))
        paths.append(str(path))
    print(json.dumps({"slug": args.slug, "seed": result.seed, "steps": result.steps,
                      "timings_s": {k: round(v, 4) for k, v in result.timings.items()}, "images": paths}, indent=2))
    return 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.catalog import implemented_slugs

    out = home_dir() / "demo-outputs"
    image = demo_input_image(home_dir() / "demo-inputs" / "sd-img2img-input.jpeg")
    for slug in implemented_slugs():
        params = {k: (str(image) if v == "<local>" else v) for k, v in DEMO_PARAMS[slug].items()}
        ns = argparse.Namespace(slug=slug, params=json.dumps(params), out=str(out), checkpoint=None,
                                device=None, precision=None)
        if cmd_generate(ns) != 0:
            return 1
    print(f"demo images written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one request in-process and write the images")
    gen.add_argument("--slug", required=True, help="model slug, e.g. sd1.5-scifi")
    gen.add_argument("--params", default="{}", help="request JSON (or @file.json), as sent to the API")
    gen.add_argument("--out", default="outputs", help="directory for the images")
    gen.add_argument("--checkpoint", help="local diffusers checkpoint directory (default: tiny demo checkpoint)")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    gen.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="generate one image per implemented slug with the tiny demo models")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
