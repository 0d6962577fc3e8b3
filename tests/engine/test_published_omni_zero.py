"""Omni-Zero from artifacts laid out as their publishers publish them (tiny weights, real names and key layouts).

write_tiny -> check -> materialize -> load -> generate equals the engine's own tiny checkpoint with
the same weights; the ZoeDepth ``.pt`` converts to exactly the transformers weights; incomplete
or wrong sets name the problem.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffserve.engine.models.omni_zero import published
from diffserve.engine.models.omni_zero.tiny import build_tiny_omni_zero, synthetic_portrait
from tests.devices import torch_components

SLUG = "omni-zero"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return published.write_tiny(tmp_path_factory.mktemp("published-omni-zero"))


def test_published_layout_has_the_real_names(artifacts):
    root = artifacts["base"].parent
    assert (root / "InstantID" / "ip-adapter.bin").is_file()
    assert (root / "IP-Adapter" / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors").is_file()
    names = {p.name for p in (root / "antelopev2" / "models" / "antelopev2").iterdir()}
    assert names == {"scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"}
    bin_state = torch.load(artifacts["instantid_adapter"], weights_only=True)
    assert set(bin_state) == {"image_proj", "ip_adapter"} and "1.to_k_ip.weight" in bin_state["ip_adapter"]
    pt = torch.load(artifacts["depth_estimator"], weights_only=True)["model"]
    assert "core.core.pretrained.model.blocks.0.attn.qkv.weight" in pt


def test_complete_set_passes_check(artifacts):
    assert published.check(SLUG, artifacts) == []


def test_generate_from_published_equals_the_engine_tiny_checkpoint(artifacts, tmp_path):
    from diffserve.engine.models.omni_zero import pipeline as omni_zero

    root = artifacts["base"].parent
    # The transformers ZoeDepth folder holds the same weights with the engine tiny's preprocessor config.
    same = dict(artifacts, depth_estimator=root / "zoedepth-tiny")
    assert published.check(SLUG, same) == []
    ours = torch_components(published.materialize(SLUG, same, tmp_path / "materialized"))
    reference = torch_components(build_tiny_omni_zero(tmp_path / "engine-tiny"))
    kwargs = dict(identity_image=synthetic_portrait(96, 128), style_image=synthetic_portrait(128, 128, shade=40),
                  base_image=synthetic_portrait(96, 128, shade=-20), num_steps=2, seed=3, max_side=64)
    a = omni_zero.generate(ours, **kwargs).images
    b = omni_zero.generate(reference, **kwargs).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() == 0


def test_zoedepth_pt_converts_to_exactly_the_transformers_weights(artifacts, tmp_path):
    from transformers import ZoeDepthForDepthEstimation

    from diffserve.engine.models.omni_zero import zoedepth

    converted = ZoeDepthForDepthEstimation.from_pretrained(zoedepth.convert(artifacts["depth_estimator"],
                                                                            tmp_path / "zoe"))
    original = ZoeDepthForDepthEstimation.from_pretrained(artifacts["base"].parent / "zoedepth-tiny")
    a, b = converted.state_dict(), original.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_materialized_pt_route_loads_and_generates(artifacts, tmp_path):
    from diffserve.engine.models.omni_zero import pipeline as omni_zero

    components = torch_components(published.materialize(SLUG, artifacts, tmp_path / "m"))
    assert components.config.omni_zero.depth_processor["do_pad"] is True
    result = omni_zero.generate(components, identity_image=synthetic_portrait(96, 128),
                                style_image=synthetic_portrait(128, 128, shade=40),
                                base_image=synthetic_portrait(96, 128, shade=-20), num_steps=1, seed=1, max_side=64)
    assert result.images[0].shape == (64, 48, 3)


def test_transformers_zoedepth_without_preprocessor_config_keeps_zoedepth_padding(artifacts, tmp_path):
    folder = tmp_path / "zoe-no-processor"
    shutil.copytree(artifacts["base"].parent / "zoedepth-tiny", folder)
    (folder / "preprocessor_config.json").unlink()
    out = published.materialize(SLUG, dict(artifacts, depth_estimator=folder), tmp_path / "m")
    from diffserve.engine.checkpoint import read_architecture

    processor = read_architecture(out).omni_zero.depth_processor
    assert processor["do_pad"] is True and processor["size"] == {"height": 384, "width": 512}


def _messages(problems, role):
    return [p.message for p in problems if p.role == role]


def test_one_missing_artifact_is_named(artifacts, tmp_path):
    gone = dict(artifacts, instantid_adapter=tmp_path / "InstantID" / "ip-adapter.bin")
    problems = published.check(SLUG, gone)
    assert _messages(problems, "instantid_adapter") == ["missing"]
    assert "InstantX/InstantID" in problems[0].fix
    problems = published.check(SLUG, {k: v for k, v in artifacts.items() if k != "face_models"})
    assert _messages(problems, "face_models") == ["not configured"]


def test_ip_adapter_of_another_width_is_named(artifacts, tmp_path):
    state = torch.load(artifacts["instantid_adapter"], weights_only=True)
    state["ip_adapter"] = {k: torch.zeros(v.shape[0], v.shape[1] * 2) for k, v in state["ip_adapter"].items()}
    torch.save(state, tmp_path / "ip-adapter.bin")
    (msg,) = _messages(published.check(SLUG, dict(artifacts, instantid_adapter=tmp_path / "ip-adapter.bin")),
                       "instantid_adapter")
    assert "to_k_ip" in msg and "another base" in msg


def test_face_pack_without_a_detector_and_unmappable_zoedepth_keys_are_named(artifacts, tmp_path):
    pack = tmp_path / "antelopev2"
    shutil.copytree(artifacts["face_models"], pack)
    next(pack.rglob("scrfd_10g_bnkps.onnx")).unlink()
    assert "detector" in _messages(published.check(SLUG, dict(artifacts, face_models=pack)), "face_models")[0]
    state = torch.load(artifacts["depth_estimator"], weights_only=True)
    state["model"]["patch_transformer.embedding_convPxP.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "ZoeD_NK.pt")
    (msg,) = _messages(published.check(SLUG, dict(artifacts, depth_estimator=tmp_path / "ZoeD_NK.pt")),
                       "depth_estimator")
    assert "cannot map" in msg and "patch_transformer" in msg
