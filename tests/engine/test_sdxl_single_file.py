"""SDXL single-file checkpoints (segmind-vega, omni-zero's base): the SGM layout written by
diffserve.engine.models.sd.ldm_keys, converted by diffusers' single-file loading (diffserve.engine.models.sd.published), equals the
diffusers folder it was written from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffserve.engine import models_file
from diffserve.engine.models.sd.published import materialize_checkpoint, write_tiny_single_file, write_tiny_sdxl_single_file
from diffserve.engine.tiny.checkpoints import build_tiny_sd15, build_tiny_sdxl
from tests.devices import torch_components

COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
              "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl-single-file")
    folder = build_tiny_sdxl(root / "Segmind-Vega")
    single = write_tiny_sdxl_single_file(root / "vega.safetensors", folder)
    return {"folder": folder, "single": single,
            "from_folder": materialize_checkpoint(folder, root / "engine" / "from-folder", "sdxl"),
            "from_single": materialize_checkpoint(single, root / "engine" / "from-single", "sdxl")}


def test_layout_is_sgm(sdxl):
    from diffserve.engine.models.sd.published import read_shapes

    keys = set(read_shapes(sdxl["single"]))
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert {"conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.ln_final.weight"} <= keys
    assert not any(".q_proj." in k for k in keys if k.startswith("conditioner.embedders.1."))


def test_converted_weights_equal_the_folder(sdxl):
    from safetensors.torch import load_file

    assert (sdxl["from_single"] / "unet").is_dir() and not (sdxl["from_single"] / "unet").is_symlink()
    for component, name in COMPONENTS.items():
        a = load_file(str(sdxl["folder"] / component / f"{name}.safetensors"))
        b = load_file(str(sdxl["from_single"] / component / f"{name}.safetensors"))
        assert sorted(a) == sorted(b), component
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_single_file_output_equals_folder_output(sdxl):
    from diffserve.engine.catalog import get_model
    from diffserve.engine.pipelines import run

    params = get_model("segmind-vega").validate({"prompt": "a city at night", "negative_prompt": "blurry",
                                                  "num_inference_steps": 20, "seed": 11})
    # The catalog allows only 1024x1024 and 20+ steps; the comparison needs neither, so it runs small and short.
    params.update(num_inference_steps=3, img_width=256, img_height=256)
    images = [torch.as_tensor(run("segmind-vega", dict(params), torch_components(sdxl[k])).images).float()
              for k in ("from_single", "from_folder")]
    assert images[0].shape == images[1].shape
    assert images[0].sub(images[1]).abs().max().item() == 0.0


def test_check_slug_accepts_the_single_file(sdxl):
    assert models_file.check_slug("segmind-vega", {"checkpoint": sdxl["single"]}) == []
    # omni-zero's SDXL base takes the same check; its other (unconfigured) roles report themselves.
    problems = models_file.check_slug("omni-zero", {"base": sdxl["single"]})
    assert problems and [p for p in problems if p.role == "base"] == []


def test_sd15_single_file_is_the_wrong_family(tmp_path):
    sd15 = write_tiny_single_file(tmp_path / "scifi.safetensors", build_tiny_sd15(tmp_path / "sd15"))
    (problem,) = models_file.check_slug("segmind-vega", {"checkpoint": sd15})
    assert problem.role == "checkpoint"
    assert "SD1.5-family single file" in problem.message and "needs an SDXL-family" in problem.message
