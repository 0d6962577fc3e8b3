"""Compute floors: the least time a request can take on an H100, from its FLOPs (DESIGN.md).

This is the one place the numbers of DESIGN.md's "Compute floors" section live. A floor is
``FLOPs of the request / 800 TFLOP/s`` (H100 SXM dense bf16): no real run reaches it, so
``fraction_of_floor = floor_ms / measured_ms`` (1.0 = at the floor) says how much of the
hardware a measured GPU run used. It is only computed for GPU results; a CPU run gets none.

The per-request floor of the SD1.5 and Segmind-Vega slugs is computed from per-evaluation
FLOPs, so it follows the benchmarked settings (steps, strength, resolution, samples, CFG):

    TFLOP = steps_run * unet(res) * (2 if CFG else 1) * samples
            + vae_decode(res) * samples + vae_encode(res)      [img2img only]
    floor_ms = TFLOP / 800 * 1000

At the seed pages' example requests this gives DESIGN.md's 102 / 41 / 190 ms (checked by
tests). Omni-Zero and OminiControl have no per-evaluation FLOP model here: their floors are
the DESIGN.md constants for the reference requests in ``REFERENCE_REQUESTS``, scaled by the
number of denoising steps for other requests (flagged approximate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

H100_DENSE_BF16_TFLOPS = 800.0
"""Peak dense bf16 tensor-core throughput the floors assume (H100 SXM)."""

UNET_TFLOP_PER_IMAGE: dict[str, dict[tuple[int, int], float]] = {
    # TFLOP of one network evaluation for one image, keyed by (width, height) in pixels.
    "sd15": {(512, 512): 0.80, (512, 768): 1.29, (768, 512): 1.29},
    "segmind-vega": {(1024, 1024): 2.82},
    "sdxl": {(1024, 1024): 6.76},
    "flux": {(1024, 1024): 74.0},
}
VAE_DECODE_TFLOP: dict[tuple[int, int], float] = {(512, 512): 2.5, (1024, 1024): 10.5}
VAE_ENCODE_FRACTION = 0.5
"""The VAE encoder costs about half the decoder (derived from DESIGN.md's img2img floor)."""

REQUEST_FLOOR_MS: dict[str, float] = {
    "sd1.5-scifi": 102.0,
    "sd1.5-img2img": 41.0,
    "segmind-vega": 190.0,
    "omni-zero": 276.0,
    "ominicontrol": 387.0,
}
"""DESIGN.md's floor per request at ``REFERENCE_REQUESTS`` (H100, dense bf16)."""

REFERENCE_REQUESTS: dict[str, str] = {
    "sd1.5-scifi": "512x768, 30 steps, CFG, 1 image (seed page example)",
    "sd1.5-img2img": "512x512, 25 steps x strength 0.75 = 18 steps, CFG, 1 image",
    "segmind-vega": "1024x1024, 25 steps, CFG, 1 image",
    "omni-zero": "1024x1024, 10 steps, CFG, SDXL UNet + 2 ControlNets",
    "ominicontrol": "512x512, 8 steps, FLUX DiT with 1024 condition tokens",
}

PUBLISHED_H100: dict[str, str] = {
    "SD1.5 512x512 UNet": "104.6 it/s (stable-fast)",
    "SDXL 1024x1024, 30 steps": "1.47 s per image (TensorRT)",
}
"""Best published H100 figures (DESIGN.md), shown next to our results in reports."""
PUBLISHED_FOR_SLUG: dict[str, str] = {
    "sd1.5-scifi": "SD1.5 512x512 UNet",
    "sd1.5-img2img": "SD1.5 512x512 UNet",
    "segmind-vega": "SDXL 1024x1024, 30 steps",  # Vega is a distilled SDXL: a bound, not a like-for-like figure
}

_FAMILY_KEY = {"sd1.5-scifi": "sd15", "sd1.5-img2img": "sd15", "segmind-vega": "segmind-vega"}
_REFERENCE_STEPS = {"omni-zero": 10, "ominicontrol": 8}
"""Denoising steps of the reference requests whose floor is a DESIGN.md constant."""


@dataclass(frozen=True)
class Floor:
    slug: str
    floor_ms: float | None
    tflop: float | None
    approximate: bool
    """True when the UNet's FLOPs at a resolution outside the DESIGN.md table were scaled by pixel count."""
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"floor_ms": None if self.floor_ms is None else round(self.floor_ms, 2),
                "tflop": None if self.tflop is None else round(self.tflop, 2),
                "approximate": self.approximate, "note": self.note}


def _per_resolution(table: Mapping[tuple[int, int], float], width: int, height: int) -> tuple[float, bool]:
    if (width, height) in table:
        return table[(width, height)], False
    # Scale the nearest tabulated resolution by pixel count (attention makes it slightly more).
    (w0, h0), value = min(table.items(), key=lambda kv: abs(kv[0][0] * kv[0][1] - width * height))
    return value * (width * height) / (w0 * h0), True


def steps_run(slug: str, params: Mapping[str, Any]) -> int:
    """UNet steps a request runs (img2img runs ``int(steps * strength)``, as the pipeline does)."""
    steps = int(params.get("num_inference_steps") or params.get("number_of_steps") or params.get("steps") or 0)
    if slug == "sd1.5-img2img":
        return min(int(steps * float(params.get("strength", 1.0))), steps)
    return steps


def request_floor(slug: str, params: Mapping[str, Any]) -> Floor:
    """The compute floor of one request with these (catalog-validated) parameters."""
    if slug not in _FAMILY_KEY:
        floor = REQUEST_FLOOR_MS.get(slug)
        note = f"DESIGN.md constant for the reference request ({REFERENCE_REQUESTS.get(slug, '?')})"
        steps, ref = steps_run(slug, params), _REFERENCE_STEPS.get(slug)
        approximate = False
        if floor is not None and ref and steps and steps != ref:
            # The denoising network dominates these floors: scale by the steps actually run.
            floor, approximate = floor * steps / ref, True
            note += f", scaled to {steps} steps"
        return Floor(slug, floor, None if floor is None else floor * H100_DENSE_BF16_TFLOPS / 1000, approximate, note)
    width, height = int(params["img_width"]), int(params["img_height"])
    samples = int(params.get("samples") or 1)
    cfg = float(params.get("guidance_scale", 7.5)) > 1.0
    unet, approx_u = _per_resolution(UNET_TFLOP_PER_IMAGE[_FAMILY_KEY[slug]], width, height)
    decode, approx_d = _per_resolution(VAE_DECODE_TFLOP, width, height)
    tflop = steps_run(slug, params) * unet * (2 if cfg else 1) * samples + decode * samples
    if slug == "sd1.5-img2img":
        tflop += decode * VAE_ENCODE_FRACTION
    note = f"{steps_run(slug, params)} steps x {unet:.2f} TFLOP{' x 2 (CFG)' if cfg else ''} x {samples} image(s)"
    if approx_d:  # the VAE is convolutional: its FLOPs scale with pixels, so this stays exact enough
        note += f" + VAE decode {decode:.2f} TFLOP (scaled by pixel count)"
    return Floor(slug, tflop / H100_DENSE_BF16_TFLOPS * 1000, tflop, approx_u, note)


def unet_step_floor_ms(slug: str, params: Mapping[str, Any]) -> float | None:
    """Floor of one denoising step (the CFG pair counts once, as in the pipelines)."""
    if slug not in _FAMILY_KEY:
        return None
    unet, _ = _per_resolution(UNET_TFLOP_PER_IMAGE[_FAMILY_KEY[slug]], int(params["img_width"]),
                              int(params["img_height"]))
    batch = int(params.get("samples") or 1) * (2 if float(params.get("guidance_scale", 7.5)) > 1.0 else 1)
    return unet * batch / H100_DENSE_BF16_TFLOPS * 1000


def fraction_of_floor(floor_ms: float | None, measured_ms: float | None, device: str) -> float | None:
    """``floor / measured`` for GPU results; None on CPU or when either number is missing."""
    if floor_ms is None or not measured_ms or not str(device).startswith("cuda"):
        return None
    return floor_ms / measured_ms


def floors_markdown() -> str:
    """The floors table for reports and the README."""
    lines = ["| slug | floor per request (H100) | reference request |", "|---|---:|---|"]
    for slug, ms in REQUEST_FLOOR_MS.items():
        lines.append(f"| `{slug}` | {ms:.0f} ms | {REFERENCE_REQUESTS[slug]} |")
    lines.append("")
    lines.append(f"Floors are FLOPs / {H100_DENSE_BF16_TFLOPS:.0f} TFLOP/s (H100 dense bf16); per evaluation: "
                 "SD1.5 UNet 0.80 TFLOP/image at 512² (1.29 at 512x768), Vega UNet 2.82 and SDXL UNet 6.76 at "
                 "1024², VAE decode 2.5 (512²) / 10.5 (1024²), FLUX DiT ~74 at 1024². Best published H100: "
                 + "; ".join(f"{k}: {v}" for k, v in PUBLISHED_H100.items()) + ".")
    return "\n".join(lines)
