"""Compute floors: the least time a request can take on an H100, from its FLOPs (DESIGN.md).

The per-slug numbers of DESIGN.md's "Compute floors" section (each reference request and its
floor, the denoisers' TFLOP per evaluation) live with their model families (``diffserve.engine.models``,
``BenchmarkFigures``); this module holds the formula and the hardware constants. A floor is
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
the DESIGN.md constants for their reference requests (``BenchmarkFigures.floor_ms``), scaled by the
number of denoising steps for other requests (flagged approximate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from diffserve.benchmarks.figures import all_figures, denoiser_tflop, figures

H100_DENSE_BF16_TFLOPS = 800.0
"""Peak dense bf16 tensor-core throughput the floors assume (H100 SXM)."""

VAE_DECODE_TFLOP: dict[tuple[int, int], float] = {(512, 512): 2.5, (1024, 1024): 10.5}
VAE_ENCODE_FRACTION = 0.5
"""The VAE encoder costs about half the decoder (derived from DESIGN.md's img2img floor)."""

PUBLISHED_H100: dict[str, str] = {
    "SD1.5 512x512 UNet": "104.6 it/s (stable-fast)",
    "SDXL 1024x1024, 30 steps": "1.47 s per image (TensorRT)",
}
"""Best published H100 figures (DESIGN.md), shown next to our results in reports (a slug's
``BenchmarkFigures.published`` names one)."""


def request_floors_ms() -> dict[str, float]:
    """DESIGN.md's floor per request at each slug's reference request (H100, dense bf16), as its family states it."""
    return {slug: fig.floor_ms for slug, _, fig in all_figures()}


def reference_requests() -> dict[str, str]:
    """The request each slug's ``request_floors_ms`` is for, in words."""
    return {slug: fig.reference_request for slug, _, fig in all_figures()}


def published_for_slug(slug: str) -> str | None:
    """The ``PUBLISHED_H100`` figure shown next to ``slug``'s results (None: none)."""
    fig = figures(slug)
    return None if fig is None else fig.published


def __getattr__(name: str):
    # The per-slug tables of old, read from the families (``REQUEST_FLOOR_MS[slug]``, ...).
    views = {"REQUEST_FLOOR_MS": request_floors_ms, "REFERENCE_REQUESTS": reference_requests}
    if name in views:
        return views[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    fig = figures(slug)
    if fig is not None and fig.img2img:
        return min(int(steps * float(params.get("strength", 1.0))), steps)
    return steps


def request_floor(slug: str, params: Mapping[str, Any]) -> Floor:
    """The compute floor of one request with these (catalog-validated) parameters."""
    fig, unet_table = figures(slug), denoiser_tflop(slug)
    if unet_table is None:
        floor = None if fig is None else fig.floor_ms
        note = f"DESIGN.md constant for the reference request ({'?' if fig is None else fig.reference_request})"
        steps, ref = steps_run(slug, params), None if fig is None else fig.reference_steps
        approximate = False
        if floor is not None and ref and steps and steps != ref:
            # The denoising network dominates these floors: scale by the steps actually run.
            floor, approximate = floor * steps / ref, True
            note += f", scaled to {steps} steps"
        return Floor(slug, floor, None if floor is None else floor * H100_DENSE_BF16_TFLOPS / 1000, approximate, note)
    width, height = int(params["img_width"]), int(params["img_height"])
    samples = int(params.get("samples") or 1)
    cfg = float(params.get("guidance_scale", 7.5)) > 1.0
    unet, approx_u = _per_resolution(unet_table, width, height)
    decode, approx_d = _per_resolution(VAE_DECODE_TFLOP, width, height)
    tflop = steps_run(slug, params) * unet * (2 if cfg else 1) * samples + decode * samples
    if fig is not None and fig.img2img:
        tflop += decode * VAE_ENCODE_FRACTION
    note = f"{steps_run(slug, params)} steps x {unet:.2f} TFLOP{' x 2 (CFG)' if cfg else ''} x {samples} image(s)"
    if approx_d:  # the VAE is convolutional: its FLOPs scale with pixels, so this stays exact enough
        note += f" + VAE decode {decode:.2f} TFLOP (scaled by pixel count)"
    return Floor(slug, tflop / H100_DENSE_BF16_TFLOPS * 1000, tflop, approx_u, note)


def unet_step_floor_ms(slug: str, params: Mapping[str, Any]) -> float | None:
    """Floor of one denoising step (the CFG pair counts once, as in the pipelines)."""
    unet_table = denoiser_tflop(slug)
    if unet_table is None:
        return None
    unet, _ = _per_resolution(unet_table, int(params["img_width"]),
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
    for slug, _, fig in all_figures():
        lines.append(f"| `{slug}` | {fig.floor_ms:.0f} ms | {fig.reference_request} |")
    lines.append("")
    lines.append(f"Floors are FLOPs / {H100_DENSE_BF16_TFLOPS:.0f} TFLOP/s (H100 dense bf16); per evaluation: "
                 "SD1.5 UNet 0.80 TFLOP/image at 512² (1.29 at 512x768), Vega UNet 2.82 and SDXL UNet 6.76 at "
                 "1024², VAE decode 2.5 (512²) / 10.5 (1024²), FLUX DiT ~74 at 1024². Best published H100: "
                 + "; ".join(f"{k}: {v}" for k, v in PUBLISHED_H100.items()) + ".")
    return "\n".join(lines)
