"""OminiControl from FLUX.1-schnell and the subject LoRA file as published (tiny weights, real key prefixes)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffserve.engine.checkpoint import find_condition_lora
from diffserve.engine.models.ominicontrol import published
from tests.devices import torch_components

SLUG = "ominicontrol"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return published.write_tiny(tmp_path_factory.mktemp("published-ominicontrol"))


def test_published_lora_has_omini_name_and_peft_transformer_keys(artifacts):
    assert artifacts["subject_lora"].parts[-2:] == ("omini", "subject_512.safetensors")
    keys = load_file(str(artifacts["subject_lora"]))
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert not (artifacts["base"] / "condition_lora").exists()


def test_complete_set_passes_and_materializes_to_the_engine_layout(artifacts, tmp_path):

    assert published.check(SLUG, artifacts) == []
    out = published.materialize(SLUG, artifacts, tmp_path / "m")
    assert find_condition_lora(out).name == "subject_512.safetensors"
    components = torch_components(out)
    assert components.config.family == "flux"


def _problem(artifacts, **changes):
    problems = published.check(SLUG, dict(artifacts, **changes))
    assert problems, "expected a problem"
    return problems[0]


def test_missing_lora_is_named(artifacts, tmp_path):
    p = _problem(artifacts, subject_lora=tmp_path / "subject_512.safetensors")
    assert (p.role, p.message) == ("subject_lora", "missing") and "Yuanshi/OminiControl" in p.fix


def test_lora_of_a_unet_is_named(artifacts, tmp_path):
    path = tmp_path / "sdxl_lora.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}, str(path))
    assert "UNet" in _problem(artifacts, subject_lora=path).message


def test_lora_of_another_flux_width_is_named(artifacts, tmp_path):
    weights = load_file(str(artifacts["subject_lora"]))
    wider = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if ".lora_A." in k else v for k, v in weights.items()}
    path = tmp_path / "subject.safetensors"
    save_file(wider, str(path))
    assert "another FLUX base" in _problem(artifacts, subject_lora=path).message


def test_base_that_is_not_flux_is_named(artifacts, tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    p = _problem(artifacts, base=tmp_path)
    assert p.role == "base" and "not FLUX" in p.message
