"""Omni-Zero's published artifacts: checked against the SDXL base and assembled into the engine's layout.

Roles (``ROLES``): ``base`` (SDXL; materialized by ``diffserve.engine.models.sd.published`` when a single file and
passed here as ``base_dir``), ``image_encoder`` (h94/IP-Adapter ``models/image_encoder/``),
``ip_adapter_plus`` (``sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors``), ``instantid_adapter``
(InstantX/InstantID ``ip-adapter.bin``), ``identitynet`` (InstantID ``ControlNetModel/``),
``depth_controlnet`` (diffusers/controlnet-zoe-depth-sdxl-1.0), ``face_models`` (antelopev2 as
unzipped, searched recursively) and ``depth_estimator`` (``lllyasviel/Annotators`` ``ZoeD_M12_N.pt``
or a transformers ZoeDepth folder). ``materialize`` builds the directory of
``diffserve.engine.models.omni_zero.checkpoint`` from links to the published files — the loaders stay the one
code path for every checkpoint — and converts only the ZoeDepth ``.pt`` (``diffserve.engine.models.omni_zero.zoedepth``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from diffserve.engine.models.omni_zero.checkpoint import (
    CONTROLNET_DEPTH_DIR, CONTROLNET_IDENTITY_DIR, DEPTH_ESTIMATOR_DIR, FACE_ANALYSIS_DIR, FACE_EMBEDDING_DIM,
    IMAGE_ENCODER_DIR, INSTANTID_PUBLISHED_NAME, IP_ADAPTER_DIR,
)
from diffserve.engine.published import ArtifactProblem, mark_tiny, tiny_is_current

logger = logging.getLogger(__name__)

TINY_VERSION = 1
"""Bump when the tiny artifacts written by ``write_tiny`` change, so cached copies are rewritten."""

ROLES = {role: True for role in ("base", "image_encoder", "ip_adapter_plus", "instantid_adapter", "identitynet",
                                 "depth_controlnet", "face_models", "depth_estimator")}
"""Role -> required."""

PLUS_NAME = "ip-adapter-plus_sdxl_vit-h.safetensors"
SINGLE_FILE_BASE_DIR = ".sdxl-base"
"""Where a single-file SDXL base is converted inside the assembled checkpoint (its parts are linked from there)."""
WHERE = {
    "base": "download stabilityai/stable-diffusion-xl-base-1.0 (the diffusers folder or sd_xl_base_1.0.safetensors)",
    "image_encoder": "download h94/IP-Adapter's models/image_encoder/ folder (CLIP ViT-H/14)",
    "ip_adapter_plus": f"download h94/IP-Adapter's sdxl_models/{PLUS_NAME}",
    "instantid_adapter": f"download InstantX/InstantID's {INSTANTID_PUBLISHED_NAME}",
    "identitynet": "download InstantX/InstantID's ControlNetModel/ folder",
    "depth_controlnet": "download diffusers/controlnet-zoe-depth-sdxl-1.0 (config.json + diffusion_pytorch_model)",
    "face_models": "download insightface's antelopev2.zip and unzip it (models/antelopev2/*.onnx)",
    "depth_estimator": "download lllyasviel/Annotators' ZoeD_M12_N.pt (or a transformers ZoeDepth folder, "
                       "e.g. Intel/zoedepth-nyu)",
}
_CONTROLNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                       "diffusion_pytorch_model.bin")
_BASE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
               "scheduler")
DETECTOR_OUTPUTS = 9
"""SCRFD with keypoints: score, box and keypoints at strides 8, 16, 32."""


# -- reading -------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _unet_layers(unet_config: dict) -> list[tuple[str, int]]:
    """(processor name, inner width) of every cross-attention layer, in diffusers' order (meta tensors)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    modules = dict(unet.named_modules())
    return [(n, modules[n[: -len(".processor")]].to_k.out_features)
            for n in unet.attn_processors if n.endswith("attn2.processor")]


def _adapter_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of an IP-Adapter file's tensors by section (``image_proj``, ``ip_adapter``)."""
    from diffserve.engine.models.omni_zero.checkpoint import read_ip_adapter

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out: dict[str, dict[str, tuple[int, ...]]] = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                section, _, rest = key.partition(".")
                out.setdefault(section, {})[rest] = tuple(f.get_slice(key).get_shape())
        return out
    return {s: {k: tuple(v.shape) for k, v in part.items()} for s, part in read_ip_adapter(path).items()}


def _check_adapter(slug, role, path, layers, cross_dim, embed_dim) -> list[ArtifactProblem]:
    fix = WHERE[role]
    try:
        shapes = _adapter_shapes(path)
    except Exception as exc:  # unreadable or not a dict of tensors
        return [ArtifactProblem(slug, role, path, f"not an IP-Adapter file ({exc})", fix)]
    if set(shapes) != {"image_proj", "ip_adapter"}:
        return [ArtifactProblem(slug, role, path, f"sections {sorted(shapes)}, an IP-Adapter has image_proj and "
                                "ip_adapter", fix)]
    problems = []
    proj_in = shapes["image_proj"].get("proj_in.weight")
    if proj_in is None or "latents" not in shapes["image_proj"]:
        problems.append(ArtifactProblem(slug, role, path, "image_proj is not a Resampler (no latents/proj_in): "
                                        "a non-Plus IP-Adapter?", fix))
    elif embed_dim is not None and proj_in[1] != embed_dim:
        problems.append(ArtifactProblem(slug, role, path, f"the resampler takes {proj_in[1]}-d inputs, expected "
                                        f"{embed_dim}-d", fix))
    ip = shapes["ip_adapter"]
    if layers is not None:
        expected = {f"{2 * i + 1}.to_{kv}_ip.weight": (inner, cross_dim)
                    for i, (_, inner) in enumerate(layers) for kv in ("k", "v")}
        if set(ip) != set(expected):
            problems.append(ArtifactProblem(
                slug, role, path, f"{len(ip) // 2} cross-attention layers, the base UNet has {len(layers)}", fix))
        else:
            wrong = [k for k in expected if ip[k] != expected[k]]
            if wrong:
                problems.append(ArtifactProblem(
                    slug, role, path, f"{wrong[0]} is {list(ip[wrong[0]])}, the base UNet needs "
                    f"{list(expected[wrong[0]])} (cross-attention dim {cross_dim}): an adapter for another base",
                    fix))
    return problems


def _check_controlnet(slug, role, path, cross_dim) -> list[ArtifactProblem]:
    fix = WHERE[role]
    if not (path / "config.json").is_file():
        return [ArtifactProblem(slug, role, path, "no config.json: not a diffusers ControlNet folder", fix)]
    config = _json(path / "config.json")
    problems = []
    if config.get("_class_name") != "ControlNetModel":
        problems.append(ArtifactProblem(slug, role, path, f"a {config.get('_class_name')}, not a ControlNetModel", fix))
    if not any((path / w).is_file() for w in _CONTROLNET_WEIGHTS):
        problems.append(ArtifactProblem(slug, role, path, f"no weights ({' or '.join(_CONTROLNET_WEIGHTS)})", fix))
    if cross_dim is not None and config.get("cross_attention_dim") != cross_dim:
        problems.append(ArtifactProblem(slug, role, path, f"cross-attention dim {config.get('cross_attention_dim')}, "
                                        f"the SDXL base has {cross_dim}: a ControlNet for another base", fix))
    return problems


def _onnx_signature(path: Path) -> tuple[list[list], int, list[list]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def dims(values):
        return [[d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in values]

    return dims([i for i in graph.input if i.name not in inits]), len(graph.output), dims(graph.output)


def _check_face_models(slug, path) -> list[ArtifactProblem]:
    from diffserve.engine.models.omni_zero.face_analysis import FACE_SIZE, find_face_models

    fix = WHERE["face_models"]
    try:
        files = find_face_models(path)
    except (FileNotFoundError, OSError) as exc:
        return [ArtifactProblem(slug, "face_models", path, str(exc), fix)]
    problems = []
    inputs, n_out, _ = _onnx_signature(files.detector)
    if n_out != DETECTOR_OUTPUTS or len(inputs) != 1 or len(inputs[0]) != 4 or inputs[0][1] != 3:
        problems.append(ArtifactProblem(slug, "face_models", files.detector,
                                        f"detector signature {inputs} -> {n_out} outputs; SCRFD with keypoints takes "
                                        f"[1, 3, H, W] and returns {DETECTOR_OUTPUTS}", fix))
    inputs, n_out, outputs = _onnx_signature(files.recognizer)
    if inputs[0][1:] != [3, FACE_SIZE, FACE_SIZE] or outputs[0][-1] != FACE_EMBEDDING_DIM:
        problems.append(ArtifactProblem(slug, "face_models", files.recognizer,
                                        f"recognizer signature {inputs} -> {outputs}; ArcFace maps [N, 3, 112, 112] "
                                        f"to {FACE_EMBEDDING_DIM}-d", fix))
    return problems


def _check_depth_estimator(slug, path) -> list[ArtifactProblem]:
    fix = WHERE["depth_estimator"]
    if path.is_file():
        from diffserve.engine.models.omni_zero import zoedepth

        try:
            state = zoedepth.read_original(path)
        except Exception as exc:
            return [ArtifactProblem(slug, "depth_estimator", path, f"unreadable ZoeDepth checkpoint ({exc})", fix)]
        unknown = zoedepth.unmapped_keys(state)
        if unknown:
            return [ArtifactProblem(slug, "depth_estimator", path,
                                    f"{len(unknown)} key(s) the ZoeDepth conversion cannot map (it covers the ZoeD_N "
                                    f"family; ZoeD_NK is not supported), e.g. {unknown[0]}",
                                    "use ZoeD_M12_N.pt, or a transformers ZoeDepth folder")]
        try:
            zoedepth.config_from_state(state)
        except KeyError as exc:
            return [ArtifactProblem(slug, "depth_estimator", path, f"incomplete ZoeDepth checkpoint: no {exc}", fix)]
        return []
    if not (path / "config.json").is_file():
        return [ArtifactProblem(slug, "depth_estimator", path, "neither a ZoeDepth .pt nor a transformers folder", fix)]
    if not any((path / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
        return [ArtifactProblem(slug, "depth_estimator", path, "no model.safetensors", fix)]
    return []


# -- the interface -------------------------------------------------------------------------------

def check(slug: str, artifacts: Mapping[str, Path]) -> list[ArtifactProblem]:
    """Every problem with Omni-Zero's artifacts: missing files, and shapes that do not fit the SDXL base."""
    problems: list[ArtifactProblem] = []
    paths = {role: Path(p) for role, p in artifacts.items()}
    present = {}
    for role in ROLES:
        path = paths.get(role)
        if path is None:
            problems.append(ArtifactProblem(slug, role, None, "not configured", WHERE[role]))
        elif not path.exists():
            problems.append(ArtifactProblem(slug, role, path, "missing", WHERE[role]))
        else:
            present[role] = path

    layers = cross_dim = None
    base = present.get("base")
    if base is not None and base.is_dir():
        unet_cfg = base / "unet" / "config.json"
        if not unet_cfg.is_file():
            problems.append(ArtifactProblem(slug, "base", base, "no unet/config.json: not a diffusers SDXL folder",
                                            WHERE["base"]))
        else:
            config = _json(unet_cfg)
            if config.get("addition_embed_type") != "text_time":
                problems.append(ArtifactProblem(slug, "base", base, "the UNet is not an SDXL UNet (no text_time "
                                                "embedding)", WHERE["base"]))
            else:
                cross_dim = int(config["cross_attention_dim"])
                layers = _unet_layers(config)
    elif base is not None:  # a single file: its architecture is checked as segmind-vega's would be
        from diffserve.engine.models.sd import published as sd

        problems += sd.check_checkpoint(slug, "base", base, "sdxl")
        # The adapters are then checked by width only.

    hidden = None
    if "image_encoder" in present:
        enc = present["image_encoder"]
        cfg_path = enc / "config.json"
        if not cfg_path.is_file():
            problems.append(ArtifactProblem(slug, "image_encoder", enc, "no config.json", WHERE["image_encoder"]))
        else:
            cfg = _json(cfg_path)
            vision = cfg.get("vision_config", cfg)
            if "CLIPVisionModelWithProjection" not in cfg.get("architectures", []) and cfg.get(
                    "model_type") not in ("clip_vision_model", "clip"):
                problems.append(ArtifactProblem(slug, "image_encoder", enc, f"a {cfg.get('architectures')}, not a CLIP "
                                                "vision model", WHERE["image_encoder"]))
            hidden = int(vision["hidden_size"]) if "hidden_size" in vision else None
    if "ip_adapter_plus" in present:
        problems += _check_adapter(slug, "ip_adapter_plus", present["ip_adapter_plus"], layers, cross_dim, hidden)
    if "instantid_adapter" in present:
        problems += _check_adapter(slug, "instantid_adapter", present["instantid_adapter"], layers, cross_dim,
                                   FACE_EMBEDDING_DIM)
    for role in ("identitynet", "depth_controlnet"):
        if role in present:
            problems += _check_controlnet(slug, role, present[role], cross_dim)
    if "face_models" in present:
        problems += _check_face_models(slug, present["face_models"])
    if "depth_estimator" in present:
        problems += _check_depth_estimator(slug, present["depth_estimator"])
    return problems


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink() if not link.is_dir() or link.is_symlink() else shutil.rmtree(link)
    os.symlink(Path(target).resolve(), link)


def _controlnet_dir(source: Path, out: Path) -> None:
    """The ControlNet folder as published, or, when only the fp16 file is published, it under the plain name."""
    if (source / _CONTROLNET_WEIGHTS[0]).is_file() or (source / _CONTROLNET_WEIGHTS[2]).is_file():
        _link(source, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    _link(source / "config.json", out / "config.json")
    _link(source / _CONTROLNET_WEIGHTS[1], out / _CONTROLNET_WEIGHTS[0])


def materialize(slug: str, artifacts: Mapping[str, Path], out: Path, *, base_dir: Path | None = None) -> Path:
    """Assemble ``out`` in ``diffserve.engine.models.omni_zero.checkpoint``'s layout; ``base_dir``: the SDXL diffusers folder.

    Links only, except the ZoeDepth ``.pt``, converted to a transformers folder, and a transformers
    ZoeDepth folder without ``preprocessor_config.json``, given ZoeDepth's documented one.
    """
    from diffserve.engine.models.omni_zero.checkpoint import ZOEDEPTH_PROCESSOR_DEFAULTS

    a = {role: Path(p) for role, p in artifacts.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(base_dir) if base_dir is not None else a["base"]
    if base.is_file():  # an SDXL single file: converted into diffusers folders beside the links
        from diffserve.engine.models.sd import published as sd

        base = sd.materialize_checkpoint(base, out / SINGLE_FILE_BASE_DIR, "sdxl")
    if not (base / "model_index.json").is_file():
        raise ValueError(f"{slug}: base {base} is not a diffusers SDXL folder")
    for part in _BASE_PARTS:
        if (base / part).exists():
            _link(base / part, out / part)
    _link(a["image_encoder"], out / IMAGE_ENCODER_DIR)
    _link(a["ip_adapter_plus"], out / IP_ADAPTER_DIR / PLUS_NAME)
    _link(a["instantid_adapter"], out / IP_ADAPTER_DIR / INSTANTID_PUBLISHED_NAME)
    _controlnet_dir(a["identitynet"], out / CONTROLNET_IDENTITY_DIR)
    _controlnet_dir(a["depth_controlnet"], out / CONTROLNET_DEPTH_DIR)
    _link(a["face_models"], out / FACE_ANALYSIS_DIR)
    depth = a["depth_estimator"]
    target = out / DEPTH_ESTIMATOR_DIR
    if depth.is_file():
        from diffserve.engine.models.omni_zero import zoedepth

        if target.is_symlink():
            target.unlink()
        zoedepth.convert(depth, target)
    elif (depth / "preprocessor_config.json").is_file():
        _link(depth, target)
    else:
        logger.warning("%s: %s has no preprocessor_config.json; writing ZoeDepth's documented defaults %s", slug,
                       depth, ZOEDEPTH_PROCESSOR_DEFAULTS)
        target.mkdir(parents=True, exist_ok=True)
        for item in depth.iterdir():
            _link(item, target / item.name)
        processor = {"image_processor_type": "ZoeDepthImageProcessor", **ZOEDEPTH_PROCESSOR_DEFAULTS}
        (target / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def write_tiny(root: Path) -> dict[str, Path]:
    """Tiny random-weight Omni-Zero artifacts, each in its publisher's layout (same weights as ``build_tiny_omni_zero``).

    Also writes ``zoedepth-tiny/``, the same ZoeDepth weights as a transformers folder (with its
    64x64 preprocessor config), for tests that compare against the engine's own tiny checkpoint.
    """
    import torch
    from transformers import ZoeDepthForDepthEstimation

    from diffserve.engine.models.omni_zero import zoedepth
    from diffserve.engine.models.omni_zero.tiny import build_landmark_models, build_tiny_omni_zero

    root = Path(root)
    ip, instantid, annotators = root / "IP-Adapter", root / "InstantID", root / "Annotators"
    paths = {
        "base": root / "stable-diffusion-xl-base-1.0", "image_encoder": ip / "models" / "image_encoder",
        "ip_adapter_plus": ip / "sdxl_models" / PLUS_NAME, "instantid_adapter": instantid / INSTANTID_PUBLISHED_NAME,
        "identitynet": instantid / "ControlNetModel", "depth_controlnet": root / "controlnet-zoe-depth-sdxl-1.0",
        "face_models": root / "antelopev2", "depth_estimator": annotators / "ZoeD_M12_N.pt",
    }
    if tiny_is_current(root, TINY_VERSION):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        internal = build_tiny_omni_zero(Path(tmp) / "internal", force=True)
        base = root / "stable-diffusion-xl-base-1.0"
        base.mkdir(exist_ok=True)
        for part in _BASE_PARTS:
            shutil.move(str(internal / part), str(base / part))
        shutil.move(str(internal / IMAGE_ENCODER_DIR), str(ip / "models" / "image_encoder"))
        (ip / "sdxl_models").mkdir(parents=True, exist_ok=True)
        shutil.move(str(internal / IP_ADAPTER_DIR / PLUS_NAME), str(ip / "sdxl_models" / PLUS_NAME))
        instantid.mkdir(exist_ok=True)
        shutil.move(str(internal / IP_ADAPTER_DIR / "ip-adapter-instantid.bin"),
                    str(instantid / INSTANTID_PUBLISHED_NAME))
        shutil.move(str(internal / CONTROLNET_IDENTITY_DIR), str(instantid / "ControlNetModel"))
        shutil.move(str(internal / CONTROLNET_DEPTH_DIR), str(root / "controlnet-zoe-depth-sdxl-1.0"))
        faces = root / "antelopev2" / "models" / "antelopev2"
        faces.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(internal / FACE_ANALYSIS_DIR), str(faces))
        build_landmark_models(faces)
        shutil.move(str(internal / DEPTH_ESTIMATOR_DIR), str(root / "zoedepth-tiny"))
    model = ZoeDepthForDepthEstimation.from_pretrained(root / "zoedepth-tiny")
    annotators.mkdir(exist_ok=True)
    torch.save({"model": zoedepth.to_original(model.state_dict())}, annotators / "ZoeD_M12_N.pt")
    mark_tiny(root, TINY_VERSION)
    return paths
