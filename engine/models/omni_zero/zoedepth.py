"""ZoeDepth's original checkpoint (isl-org ZoeDepth, ``lllyasviel/Annotators`` ``ZoeD_M12_N.pt``) as transformers loads it.

controlnet_aux's ``ZoeDetector`` — what Omni-Zero's reference runs — loads ``torch.load(path)["model"]``
into isl-org's ``ZoeDepth`` (BEiT-L/16-384 MiDaS core + metric-bins head). This module renames
that state dict into the installed transformers' ``ZoeDepthForDepthEstimation`` layout (key facts
from transformers' ``convert_zoedepth_to_hf.py``, restated for the current transformers key
names: ``backbone.beit.layers.N.attention.q_proj`` …), splits BEiT's fused ``qkv`` into
q/k/v, derives the ``ZoeDepthConfig`` from tensor shapes, and writes a transformers folder with
the isl-org inference preprocessing as its ``preprocessor_config.json``. Covered: the
single-head ZoeD_N family (ZoeD_N, ZoeD_M12_N, ZoeD_K): BEiT backbone, DPT neck (reassemble,
convs, fusion), relative head, seed/projector/attractor/log-binomial metric head. Not covered:
ZoeD_NK's patch transformer and multiple bin regressors; such keys are reported as unmapped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from diffserve.engine.models.omni_zero.checkpoint import ZOEDEPTH_PROCESSOR_DEFAULTS

logger = logging.getLogger(__name__)

_CORE = "core.core.pretrained.model."
_SCRATCH = "core.core.scratch."
_IGNORED = (re.compile(r".*relative_position_index$"), re.compile(r".*\.(k_idx|K_minus_1)$"),
            re.compile(re.escape(_CORE) + r"(head|fc_norm)\..*"))
"""Buffers and heads of the original that transformers recomputes or does not have."""


def _templates() -> list[tuple[str, str]]:
    """(original key template, transformers key template); ``{a}``/``{b}`` are integers, ``{p}`` weight|bias."""
    beit = "backbone.beit."
    rules = [
        (_CORE + "cls_token", beit + "embeddings.cls_token"),
        (_CORE + "patch_embed.proj.{p}", beit + "embeddings.patch_embeddings.projection.{p}"),
        (_CORE + "blocks.{a}.norm1.{p}", beit + "layers.{a}.layernorm_before.{p}"),
        (_CORE + "blocks.{a}.norm2.{p}", beit + "layers.{a}.layernorm_after.{p}"),
        (_CORE + "blocks.{a}.mlp.fc1.{p}", beit + "layers.{a}.mlp.fc1.{p}"),
        (_CORE + "blocks.{a}.mlp.fc2.{p}", beit + "layers.{a}.mlp.fc2.{p}"),
        (_CORE + "blocks.{a}.gamma_1", beit + "layers.{a}.lambda_1"),
        (_CORE + "blocks.{a}.gamma_2", beit + "layers.{a}.lambda_2"),
        (_CORE + "blocks.{a}.attn.proj.{p}", beit + "layers.{a}.attention.o_proj.{p}"),
        (_CORE + "blocks.{a}.attn.relative_position_bias_table",
         beit + "layers.{a}.relative_position_bias.relative_position_bias_table"),
        (_CORE + "blocks.{a}.attn.q_bias", beit + "layers.{a}.attention.q_proj.bias"),
        (_CORE + "blocks.{a}.attn.v_bias", beit + "layers.{a}.attention.v_proj.bias"),
    ]
    for k in range(1, 5):  # act_postprocess1..4 feed reassemble stage 0..3
        post = f"core.core.pretrained.act_postprocess{k}."
        rules += [(post + "0.project.0.{p}", f"neck.reassemble_stage.readout_projects.{k - 1}.0.{{p}}"),
                  (post + "3.{p}", f"neck.reassemble_stage.layers.{k - 1}.projection.{{p}}"),
                  (post + "4.{p}", f"neck.reassemble_stage.layers.{k - 1}.resize.{{p}}"),
                  (_SCRATCH + f"layer{k}_rn.weight", f"neck.convs.{k - 1}.weight")]
        # refinenet4 fuses the coarsest features first: it is fusion layer 0.
        fusion = f"neck.fusion_stage.layers.{4 - k}."
        rules += [(_SCRATCH + f"refinenet{k}.resConfUnit{{a}}.conv{{b}}.{{p}}",
                   fusion + "residual_layer{a}.convolution{b}.{p}"),
                  (_SCRATCH + f"refinenet{k}.out_conv.{{p}}", fusion + "projection.{p}")]
    for i, j in ((0, 1), (2, 2), (4, 3)):
        rules.append((_SCRATCH + f"output_conv.{i}.{{p}}", f"relative_head.conv{j}.{{p}}"))
    rules.append(("conv2.{p}", "metric_head.conv2.{p}"))
    for i, j in ((0, 1), (2, 2)):
        rules += [(f"seed_bin_regressor._net.{i}.{{p}}", f"metric_head.seed_bin_regressor.conv{j}.{{p}}"),
                  (f"seed_projector._net.{i}.{{p}}", f"metric_head.seed_projector.conv{j}.{{p}}"),
                  (f"projectors.{{a}}._net.{i}.{{p}}", f"metric_head.projectors.{{a}}.conv{j}.{{p}}"),
                  (f"attractors.{{a}}._net.{i}.{{p}}", f"metric_head.attractors.{{a}}.conv{j}.{{p}}")]
    rules.append(("conditional_log_binomial.mlp.{a}.{p}", "metric_head.conditional_log_binomial.mlp.{a}.{p}"))
    return rules


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in (("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)"), ("p", r"(?P<p>weight|bias)")):
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + "$")


_RULES = [(_regex(orig), orig, _regex(hf), hf) for orig, hf in _templates()]
_QKV = re.compile(re.escape(_CORE) + r"blocks\.(\d+)\.attn\.qkv\.weight$")


def _rename(key: str, forward: bool) -> str | None:
    for orig_re, orig, hf_re, hf in _RULES:
        match = (orig_re if forward else hf_re).match(key)
        if match:
            return (hf if forward else orig).format(**match.groupdict())
    return None


def unmapped_keys(keys) -> list[str]:
    """Keys of an original ZoeDepth state dict this conversion has no rule for (and does not ignore)."""
    return [k for k in keys if _rename(k, True) is None and not _QKV.match(k)
            and not any(p.match(k) for p in _IGNORED)]


def read_original(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an isl-org ZoeDepth ``.pt`` (``{"model": state_dict, ...}`` as released)."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) torch.save files cannot be memory-mapped
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a ZoeDepth checkpoint (expected a dict with a 'model' state dict)")
    return state


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> ``ZoeDepthForDepthEstimation`` keys; raises on keys without a rule."""
    unknown = unmapped_keys(state)
    if unknown:
        raise ValueError(f"{len(unknown)} ZoeDepth key(s) this conversion cannot map (ZoeD_NK's patch transformer "
                         f"is not covered): {', '.join(unknown[:5])}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        qkv = _QKV.match(key)
        if qkv:
            q, k, v = value.chunk(3, dim=0)
            layer = f"backbone.beit.layers.{qkv.group(1)}.attention."
            out[layer + "q_proj.weight"], out[layer + "k_proj.weight"], out[layer + "v_proj.weight"] = q, k, v
            continue
        name = _rename(key, True)
        if name is not None:
            out[name] = value
    return out


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ZoeDepthForDepthEstimation`` keys -> the original's (for writing a ``.pt`` in the publisher's layout)."""
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"backbone\.beit\.layers\.(\d+)\.", k))})
    for i in layers:
        attn = f"backbone.beit.layers.{i}.attention."
        out[f"{_CORE}blocks.{i}.attn.qkv.weight"] = torch.cat(
            [state[attn + "q_proj.weight"], state[attn + "k_proj.weight"], state[attn + "v_proj.weight"]])
    for key, value in state.items():
        if re.match(r"backbone\.beit\.layers\.\d+\.attention\.[qkv]_proj\.weight$", key):
            continue
        name = _rename(key, False)
        if name is None:
            raise ValueError(f"no original ZoeDepth key for {key}")
        out[name] = value
    return out


def config_from_state(state: dict[str, torch.Tensor]):
    """The ``ZoeDepthConfig`` of an original state dict, read from tensor shapes (depth range: ZoeD_N's)."""
    from transformers import BeitConfig, ZoeDepthConfig

    proj = state[_CORE + "patch_embed.proj.weight"]
    hidden, patch = proj.shape[0], proj.shape[2]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(_CORE) + r"blocks\.(\d+)\.", k)))
    table = state[_CORE + "blocks.0.attn.relative_position_bias_table"]
    window = (math.isqrt(table.shape[0] - 3) + 1) // 2  # (2W - 1)^2 relative positions + 3 for the class token
    stages = [f"stage{layers * (i + 1) // 4}" for i in range(4)]  # BEiT-L: blocks 6, 12, 18, 24 feed the neck
    backbone = BeitConfig(image_size=window * patch, patch_size=patch, num_hidden_layers=layers, hidden_size=hidden,
                          intermediate_size=state[_CORE + "blocks.0.mlp.fc1.weight"].shape[0],
                          num_attention_heads=table.shape[1], use_relative_position_bias=True,
                          reshape_hidden_states=False, out_features=stages)
    attractors = sorted({int(m.group(1)) for k in state if (m := re.match(r"attractors\.(\d+)\.", k))})
    return ZoeDepthConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[state[f"core.core.pretrained.act_postprocess{k}.3.weight"].shape[0] for k in range(1, 5)],
        fusion_hidden_size=state[_SCRATCH + "layer1_rn.weight"].shape[0],
        num_relative_features=state[_SCRATCH + "output_conv.2.weight"].shape[0],
        bottleneck_features=state["conv2.weight"].shape[0],
        bin_embedding_dim=state["seed_projector._net.2.weight"].shape[0],
        num_attractors=[state[f"attractors.{i}._net.2.weight"].shape[0] for i in attractors],
        bin_configurations=[{"n_bins": state["seed_bin_regressor._net.2.weight"].shape[0],
                             "min_depth": 1e-3, "max_depth": 10.0}],
    )


def convert(path: str | Path, out: Path) -> Path:
    """Write a transformers ZoeDepth folder (weights, config, preprocessor) converted from an original ``.pt``."""
    from transformers import ZoeDepthForDepthEstimation

    state = read_original(path)
    config = config_from_state(state)
    with torch.device("meta"):
        model = ZoeDepthForDepthEstimation(config)
    model.load_state_dict(to_transformers(state), strict=True, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor = {"image_processor_type": "ZoeDepthImageProcessor", **ZOEDEPTH_PROCESSOR_DEFAULTS}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    logger.info("converted %s to a transformers ZoeDepth folder in %s", path, out)
    return out
