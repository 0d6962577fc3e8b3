"""A tiny random-weight Omni-Zero checkpoint, in the real layout (``diffserve.engine.models.omni_zero.checkpoint``).

Every part has its release's structure at toy width, saved the way the release ships it, so the
tiny directory loads through the same code as a real one:

* SDXL base: the tiny SDXL configs of ``diffserve.engine.tiny.checkpoints``, the UNet at half width and with SDXL's two
  attention layers per down block (``down_blocks.2.attentions.1`` and ``up_blocks.0.attentions.1``
  must exist: the composition and style adapters live there);
* ``image_encoder/``: a CLIPVisionModelWithProjection (ViT; penultimate hidden states feed the
  Plus resampler);
* ``controlnet_identity/``, ``controlnet_depth/``: ControlNetModel copies of the UNet whose
  zero-initialised convolutions get small random weights, as training leaves them;
* ``ip_adapter/``: the InstantID face adapter as a ``.bin`` nested dict and IP-Adapter Plus as flat
  ``.safetensors`` keys, both in the original resampler key layout (``image_proj.layers.0.0.to_kv``,
  ``ip_adapter.1.to_k_ip`` ...), read by diffusers' converters;
* ``face_analysis/``: ``scrfd_10g_bnkps.onnx`` (three strides, two anchors per cell, sigmoid
  scores, box distances and five keypoints in stride units; input ``input.1`` [1, 3, H, W]) and
  ``glintr100.onnx`` (112x112 face -> 512-d embedding), exported from tiny torch networks;
* ``depth_estimator/``: a transformers ZoeDepthForDepthEstimation with a tiny BEiT backbone and
  a ZoeDepth ``preprocessor_config.json`` (64x64 target instead of 384x512).

How the tiny face detector finds faces: its weights are random like everything else, but three
head biases are set the way a trained head would have them. The box head's bias is 2 (boxes
extend two strides from their anchor), the keypoint head's bias places the five points in
ArcFace's template layout around the anchor, and the score head's bias is calibrated at build
time: the largest score logit over every anchor is measured on ``synthetic_portrait`` images (three
aspect ratios) and on featureless images (flat black and greys), and the bias puts the
decision threshold (sigmoid 0.5) half-way between the two. So the portraits yield a face and the
featureless images none; the first seed (of a fixed sequence) whose He-initialised detector
separates them by ``DET_MARGIN`` logits is kept, and the build fails rather than produce a
detector without that margin.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffserve.engine.models.omni_zero.face_analysis import ANCHORS_PER_CELL, ARCFACE_TEMPLATE, DET_SIZE, FACE_SIZE, STRIDES, letterbox
from diffserve.engine.models.omni_zero.checkpoint import (
    CONTROLNET_DEPTH_DIR, CONTROLNET_IDENTITY_DIR, DEPTH_ESTIMATOR_DIR, FACE_ANALYSIS_DIR, FACE_EMBEDDING_DIM,
    IMAGE_ENCODER_DIR, IP_ADAPTER_DIR, fit_size,
)

logger = logging.getLogger(__name__)

OMNI_ZERO_TINY_VERSION = 1
SEED = 0

IMAGE_ENCODER_CONFIG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32, hidden_act="gelu")
# diffusers builds the resampler with 64-wide heads and four layers from the file's shapes alone.
RESAMPLER_WIDTH = 64
RESAMPLER_DEPTH = 4
RESAMPLER_QUERIES = 16
CONTROLNET_EMBEDDING_CHANNELS = (2, 4, 4, 8)  # narrow: it runs at full image resolution
DEPTH_INPUT = 64
# The tiny SDXL UNet at half width with SDXL's two layers per block (the adapters' blocks exist):
# Omni-Zero always runs at about 1024 px and every step also runs two ControlNet copies of it.
UNET_OVERRIDES = dict(layers_per_block=2, block_out_channels=(8, 16, 32), transformer_layers_per_block=(1, 1, 1))
DET_MARGIN = 1.0
"""Logits between the weakest portrait and the strongest featureless image the calibration demands."""
FEATURELESS_VALUES = (0, 60, 128)
"""Grey levels of the flat calibration images (a random network responds most to saturated white)."""


# -- test images ----------------------------------------------------------------------------------

def synthetic_portrait(width: int = 96, height: int = 128, shade: int = 0) -> np.ndarray:
    """A synthetic head-and-shoulders portrait (RGB uint8): the tiny face detector finds a face in it.

    ``shade`` shifts the skin and background tones, for distinct but similar portraits.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    image = np.empty((height, width, 3), dtype=np.float32)
    image[..., 0] = 60 + 80 * v + shade
    image[..., 1] = 90 + 60 * u
    image[..., 2] = 150 - 50 * v + shade / 2
    shoulders = (v > 0.78) & (np.abs(u - 0.5) < 0.45)
    image[shoulders] = (40, 40, 90)
    head = ((u - 0.5) / 0.26) ** 2 + ((v - 0.42) / 0.3) ** 2 < 1
    image[head] = (225 - shade, 180, 150)
    hair = head & (v < 0.24)
    image[hair] = (60, 40, 20)
    for cx in (0.4, 0.6):
        eye = ((u - cx) / 0.045) ** 2 + ((v - 0.38) / 0.025) ** 2 < 1
        image[eye] = (30, 30, 30)
    nose = (np.abs(u - 0.5) < 0.015) & (v > 0.4) & (v < 0.5)
    image[nose] = (180, 130, 110)
    mouth = ((u - 0.5) / 0.09) ** 2 + ((v - 0.58) / 0.02) ** 2 < 1
    image[mouth] = (150, 50, 60)
    return image.clip(0, 255).astype(np.uint8)


def featureless_image(width: int = 96, height: int = 128, value: int = 128) -> np.ndarray:
    """A flat image: no face for the tiny detector (nor for a real one)."""
    return np.full((height, width, 3), value, dtype=np.uint8)


DEMO_INPUTS = {"identity": (96, 128, 0), "style": (128, 128, 40), "base": (96, 128, -20)}
"""Demo portraits (width, height, shade) for the seed page's identity, style and base/composition images."""


def write_demo_inputs(directory: str | Path) -> dict[str, Path]:
    """PNG files of the demo portraits: ``{"identity": path, "style": path, "base": path}``."""
    import PIL.Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (width, height, shade) in DEMO_INPUTS.items():
        paths[name] = directory / f"omni-zero-{name}.png"
        if not paths[name].exists():
            PIL.Image.fromarray(synthetic_portrait(width, height, shade)).save(paths[name])
    return paths


def _detector_view(image: np.ndarray) -> torch.Tensor:
    """What the pipeline shows the detector: fit to 1024 like every input, then letterboxed to 640."""
    import PIL.Image

    w, h = fit_size(image.shape[1], image.shape[0])
    fitted = np.asarray(PIL.Image.fromarray(image).resize((w, h), PIL.Image.Resampling.BICUBIC))
    return torch.from_numpy(letterbox(fitted)[0])


# -- face models ----------------------------------------------------------------------------------

def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class TinySCRFD(nn.Module):
    """SCRFD's interface at toy size: features at strides 8/16/32, per-stride score/box/keypoint heads."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 8, 2), nn.ReLU(), _conv(8, 8, 2), nn.ReLU(), _conv(8, width, 2), nn.ReLU())
        self.down = nn.ModuleList([nn.Sequential(_conv(width, width, 2), nn.ReLU()) for _ in STRIDES[1:]])
        a = ANCHORS_PER_CELL
        self.score = nn.ModuleList([_conv(width, a) for _ in STRIDES])
        self.box = nn.ModuleList([_conv(width, 4 * a) for _ in STRIDES])
        self.kps = nn.ModuleList([_conv(width, 10 * a) for _ in STRIDES])
        for m in self.modules():  # He initialisation keeps activations at unit scale through the ReLUs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x):
        feats = [self.stem(x)]
        for down in self.down:
            feats.append(down(feats[-1]))
        return feats

    def score_logits(self, x) -> torch.Tensor:
        """Largest score logit over every anchor (without the score bias), for calibration."""
        logits = [(head(f) - head.bias.view(1, -1, 1, 1)).amax() for head, f in zip(self.score, self.features(x))]
        return torch.stack(logits).amax()

    def forward(self, x):
        feats = self.features(x)

        def rows(t, width):  # [1, anchors * width, h, w] -> [h * w * anchors, width]
            return t.permute(0, 2, 3, 1).reshape(-1, width)

        scores = [rows(torch.sigmoid(head(f)), 1) for head, f in zip(self.score, feats)]
        boxes = [rows(head(f), 4) for head, f in zip(self.box, feats)]
        kps = [rows(head(f), 10) for head, f in zip(self.kps, feats)]
        return (*scores, *boxes, *kps)


class TinyArcFace(nn.Module):
    """ArcFace's interface at toy size: aligned 112x112 face -> 512-d (unnormalised) embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 8, 2), nn.ReLU(), _conv(8, 16, 2), nn.ReLU(), _conv(16, 32, 2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, FACE_EMBEDDING_DIM)

    def forward(self, x):
        return self.fc(self.body(x))


def _calibrate_detector(det: TinySCRFD) -> float:
    """Set the head biases (see the module docstring); returns the logit margin achieved."""
    with torch.no_grad():
        for head in det.box:
            head.bias.fill_(2.0)
        # Template keypoints relative to the crop centre, in units of the 4-stride default box.
        offsets = (ARCFACE_TEMPLATE - FACE_SIZE / 2) / FACE_SIZE * 4.0
        for head in det.kps:
            head.bias.copy_(torch.from_numpy(np.tile(offsets.reshape(-1), ANCHORS_PER_CELL)))
        faces = [synthetic_portrait(w, h) for w, h in ((96, 128), (128, 128), (128, 96))]
        blanks = [featureless_image(value=v) for v in FEATURELESS_VALUES]
        face_logit = min(float(det.score_logits(_detector_view(im))) for im in faces)
        blank_logit = max(float(det.score_logits(_detector_view(im))) for im in blanks)
        margin = face_logit - blank_logit
        for head in det.score:
            head.bias.fill_(-(face_logit + blank_logit) / 2)
    return margin


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str],
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as export/ uses
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["input.1"], output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True, dynamo=False)


def build_face_analysis(directory: Path, seed: int = SEED) -> None:
    """``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx`` (antelopev2 names) from tiny torch networks."""
    for attempt in range(8):
        torch.manual_seed(seed + 1000 * attempt)
        det = TinySCRFD().eval()
        margin = _calibrate_detector(det)
        if margin > DET_MARGIN:
            break
    else:
        raise RuntimeError(f"no tiny face detector separates portraits from flat images (margin {margin:.2f})")
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]
    _export_onnx(det, torch.zeros(1, 3, DET_SIZE, DET_SIZE), directory / "scrfd_10g_bnkps.onnx", names,
                 {"input.1": {2: "height", 3: "width"}, **{n: {0: f"{n}_anchors"} for n in names}})
    torch.manual_seed(seed + 1)
    rec = TinyArcFace().eval()
    _export_onnx(rec, torch.zeros(2, 3, FACE_SIZE, FACE_SIZE), directory / "glintr100.onnx", ["embedding"],
                 {"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    logger.info("tiny face models in %s (detector margin %.2f logits)", directory, margin)


# -- adapters -------------------------------------------------------------------------------------

def _linear(g: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=g) / in_features ** 0.5


def _norm(g: torch.Generator, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + 0.1 * torch.randn(width, generator=g), 0.1 * torch.randn(width, generator=g)


def resampler_state(g: torch.Generator, embed_dim: int, output_dim: int, width: int = RESAMPLER_WIDTH,
                    depth: int = RESAMPLER_DEPTH, queries: int = RESAMPLER_QUERIES, ff_mult: int = 4) -> dict:
    """A random IP-Adapter Plus / InstantID resampler in the released files' key layout."""
    state = {
        "latents": torch.randn(1, queries, width, generator=g) / width ** 0.5,
        "proj_in.weight": _linear(g, width, embed_dim), "proj_in.bias": 0.1 * torch.randn(width, generator=g),
        "proj_out.weight": _linear(g, output_dim, width), "proj_out.bias": 0.1 * torch.randn(output_dim, generator=g),
    }
    state["norm_out.weight"], state["norm_out.bias"] = _norm(g, output_dim)
    for i in range(depth):
        p = f"layers.{i}"
        state[f"{p}.0.norm1.weight"], state[f"{p}.0.norm1.bias"] = _norm(g, width)
        state[f"{p}.0.norm2.weight"], state[f"{p}.0.norm2.bias"] = _norm(g, width)
        state[f"{p}.0.to_q.weight"] = _linear(g, width, width)
        state[f"{p}.0.to_kv.weight"] = _linear(g, 2 * width, width)
        state[f"{p}.0.to_out.weight"] = _linear(g, width, width)
        state[f"{p}.1.0.weight"], state[f"{p}.1.0.bias"] = _norm(g, width)
        state[f"{p}.1.1.weight"] = _linear(g, width * ff_mult, width)
        state[f"{p}.1.3.weight"] = _linear(g, width, width * ff_mult)
    return state


def ip_adapter_state(g: torch.Generator, unet) -> dict:
    """Random ``to_k_ip``/``to_v_ip`` for every cross-attention layer, numbered 1, 3, 5 ... as released."""
    state = {}
    cross = unet.config.cross_attention_dim
    modules = dict(unet.named_modules())
    index = 0
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = modules[name[: -len(".processor")]].to_k.out_features
            state[f"{2 * index + 1}.to_k_ip.weight"] = _linear(g, inner, cross)
            state[f"{2 * index + 1}.to_v_ip.weight"] = _linear(g, inner, cross)
            index += 1
    return state


# -- the checkpoint -------------------------------------------------------------------------------

def _randomize_zero_convs(controlnet, g: torch.Generator) -> None:
    """Give ControlNet's zero-initialised convolutions small random weights (training would)."""
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5 / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.05)


def _build_depth_estimator(directory: Path, seed: int) -> None:
    from transformers import BeitConfig, ZoeDepthConfig, ZoeDepthForDepthEstimation

    backbone = BeitConfig(image_size=DEPTH_INPUT, patch_size=16, num_hidden_layers=4, hidden_size=32,
                          intermediate_size=37, num_attention_heads=2, use_relative_position_bias=True,
                          reshape_hidden_states=False, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=(8, 16, 32, 32), fusion_hidden_size=16,
                            bottleneck_features=16, num_relative_features=8, bin_embedding_dim=16,
                            num_attractors=(4, 2, 2, 1),
                            bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0}])
    torch.manual_seed(seed)
    model = ZoeDepthForDepthEstimation(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Freshly initialised, the metric bins collapse to one depth everywhere; spread the biases.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    model.save_pretrained(directory)
    processor = {
        "image_processor_type": "ZoeDepthImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": True, "keep_aspect_ratio": True, "ensure_multiple_of": 32, "resample": 2,
        "size": {"height": DEPTH_INPUT, "width": DEPTH_INPUT},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _is_current(path: Path) -> bool:
    marker = path / "diffserve_tiny.json"
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return info.get("kind") == "omni-zero" and info.get("omni_zero_version") == OMNI_ZERO_TINY_VERSION


def build_tiny_omni_zero(path: str | Path, *, force: bool = False) -> Path:
    """The tiny Omni-Zero checkpoint directory (SDXL base + every Omni-Zero part)."""
    from diffusers import (
        AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffserve.engine.tiny import checkpoints as tiny

    path = Path(path)
    if not force and _is_current(path):
        return path
    path.mkdir(parents=True, exist_ok=True)

    # SDXL base with SDXL's two attention layers per down block.
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**dict(tiny.SDXL_UNET_CONFIG, **UNET_OVERRIDES))
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**tiny.VAE_CONFIG, force_upcast=True)
    tokenizer = tiny.build_clip_tokenizer(path / "tokenizer")
    tokenizer_2 = tiny.build_clip_tokenizer(path / "tokenizer_2")
    torch.manual_seed(SEED)
    text_encoder = tiny.clip_text_encoder(tokenizer, with_projection=False)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = tiny.clip_text_encoder(tokenizer_2, with_projection=True)
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in tiny.SDXL_SCHEDULER.items() if k != "_class_name"})
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    ).save_pretrained(path, safe_serialization=True)

    # IP-Adapter's CLIP image encoder.
    torch.manual_seed(SEED + 2)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)).eval().save_pretrained(
        path / IMAGE_ENCODER_DIR, safe_serialization=True)

    # IdentityNet and the depth ControlNet, initialised from the UNet like real ControlNets.
    for offset, sub in ((3, CONTROLNET_IDENTITY_DIR), (4, CONTROLNET_DEPTH_DIR)):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)
        _randomize_zero_convs(controlnet, torch.Generator().manual_seed(SEED + offset))
        controlnet.save_pretrained(path / sub, safe_serialization=True)

    # InstantID (.bin, nested) and IP-Adapter Plus (.safetensors, flat), released key layouts.
    g = torch.Generator().manual_seed(SEED + 5)
    cross = unet.config.cross_attention_dim
    adapters = path / IP_ADAPTER_DIR
    adapters.mkdir(exist_ok=True)
    identity = {"image_proj": resampler_state(g, FACE_EMBEDDING_DIM, cross), "ip_adapter": ip_adapter_state(g, unet)}
    torch.save(identity, adapters / "ip-adapter-instantid.bin")
    plus = {"image_proj": resampler_state(g, IMAGE_ENCODER_CONFIG["hidden_size"], cross),
            "ip_adapter": ip_adapter_state(g, unet)}
    save_file({f"{section}.{k}": v.contiguous() for section, part in plus.items() for k, v in part.items()},
              str(adapters / "ip-adapter-plus_sdxl_vit-h.safetensors"))

    build_face_analysis(path / FACE_ANALYSIS_DIR, SEED + 6)
    _build_depth_estimator(path / DEPTH_ESTIMATOR_DIR, SEED + 7)
    (path / "diffserve_tiny.json").write_text(json.dumps(
        {"version": tiny.TINY_VERSION, "kind": "omni-zero", "omni_zero_version": OMNI_ZERO_TINY_VERSION,
         "seed": SEED}))
    logger.info("built tiny Omni-Zero checkpoint in %s", path)
    return path


class _TinyHead(nn.Module):
    """A toy network with a given input side and output width (antelopev2's landmark and attribute models)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(_conv(3, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(self.body(x))


ANTELOPEV2_EXTRAS = {"1k3d68.onnx": (192, 3309), "2d106det.onnx": (192, 212), "genderage.onnx": (96, 3)}
"""The rest of the antelopev2 pack (input side, output width), unused by Omni-Zero but shipped in the zip."""


def build_landmark_models(directory: Path, seed: int = SEED) -> None:
    """antelopev2's 3D-landmark, 2D-landmark and gender/age models at toy size with their real signatures."""
    for i, (name, (side, width)) in enumerate(ANTELOPEV2_EXTRAS.items()):
        torch.manual_seed(seed + 10 + i)
        _export_onnx(_TinyHead(width).eval(), torch.zeros(1, 3, side, side), Path(directory) / name, ["fc1"],
                     {"input.1": {0: "batch"}, "fc1": {0: "batch"}})
