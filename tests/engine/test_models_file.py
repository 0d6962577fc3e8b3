"""models.toml: parsing, the artifact checks, single-file conversion, materialization (diffserve.engine.models_file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffserve.engine import models_file
from diffserve.engine.models_file import ModelsFileError, load_models_file, parse_models_file
from tests.devices import torch_components


@pytest.fixture(scope="module")
def demo_models(tiny_checkpoints, diffserve_home) -> Path:
    return diffserve_home / "checkpoints" / "published" / "models.toml"


def test_parse_relative_paths_and_dotted_slugs(tmp_path):
    f = tmp_path / "models.toml"
    f.write_text('[sd1.5-scifi]\ncheckpoint = "weights/scifi.safetensors"\n["segmind-vega"]\ncheckpoint = "/abs/vega"\n')
    config = load_models_file(f)
    assert config.entries["sd1.5-scifi"]["checkpoint"] == tmp_path / "weights" / "scifi.safetensors"
    assert config.entries["segmind-vega"]["checkpoint"] == Path("/abs/vega")


def test_unknown_slug_and_role_name_the_valid_ones():
    with pytest.raises(ModelsFileError, match="valid slugs: sd1.5-scifi, sd1.5-img2img"):
        parse_models_file({"sdxl-turbo": {"checkpoint": "x"}})
    with pytest.raises(ModelsFileError, match="unknown role 'unet'; valid roles: checkpoint"):
        parse_models_file({"sd1.5-scifi": {"unet": "x"}})


def test_demo_models_are_complete(demo_models):
    config = load_models_file(demo_models)
    problems = models_file.check(config)
    assert problems == {slug: [] for slug in config.entries}
    report = models_file.format_report(config, problems)
    assert "sd1.5-scifi: OK" in report and "single file, the tiny demo SD1.5" in report


def test_single_file_equals_diffusers_folder(tiny_checkpoints, demo_models):
    """sd1.5-scifi is an LDM single file converted by diffusers' single-file loading; sd1.5-img2img the
    diffusers folder it was written from: the same pipeline output, bit for bit."""
    from diffserve.engine.catalog import get_model
    from diffserve.engine.pipelines import run

    entries = load_models_file(demo_models).entries
    assert entries["sd1.5-scifi"]["checkpoint"].suffix == ".safetensors"
    assert (entries["sd1.5-img2img"]["checkpoint"] / "model_index.json").is_file()
    params = get_model("sd1.5-scifi").validate({"prompt": "a city", "num_inference_steps": 20, "seed": 7,
                                                 "img_width": 512, "img_height": 512})
    images = [run("sd1.5-scifi", dict(params), torch_components(tiny_checkpoints[slug])).images
              for slug in ("sd1.5-scifi", "sd1.5-img2img")]
    assert tiny_checkpoints["sd1.5-scifi"] != tiny_checkpoints["sd1.5-img2img"]
    assert torch.as_tensor(images[0]).float().sub(torch.as_tensor(images[1]).float()).abs().max().item() == 0.0


def _config(tmp_path: Path, text: str):
    f = tmp_path / "models.toml"
    f.write_text(text)
    return load_models_file(f)


def test_missing_artifact_is_named(tmp_path):
    config = _config(tmp_path, '["sd1.5-scifi"]\ncheckpoint = "nowhere.safetensors"\n')
    (problem,) = models_file.check(config)["sd1.5-scifi"]
    assert problem.role == "checkpoint" and "missing" in problem.message and "download" in problem.fix


def test_wrong_architecture_folder_is_named(tmp_path, demo_models):
    vega = load_models_file(demo_models).entries["segmind-vega"]["checkpoint"]
    config = _config(tmp_path, f'["sd1.5-img2img"]\ncheckpoint = "{vega}"\n')
    (problem,) = models_file.check(config)["sd1.5-img2img"]
    assert "SDXL-family UNet" in problem.message and "SD1.5" in problem.message


def test_wrong_shape_single_file_is_named(tmp_path, demo_models):
    from safetensors.torch import load_file, save_file

    single = load_models_file(demo_models).entries["sd1.5-scifi"]["checkpoint"]
    weights = load_file(str(single))
    key = "model.diffusion_model.input_blocks.0.0.weight"  # conv_in: 4 latent channels
    weights[key] = torch.zeros(weights[key].shape[0], 9, *weights[key].shape[2:])
    bad = tmp_path / "inpainting.safetensors"
    save_file(weights, str(bad))
    config = _config(tmp_path, f'["sd1.5-scifi"]\ncheckpoint = "{bad.name}"\n')
    (problem,) = models_file.check(config)["sd1.5-scifi"]
    assert "matches no known SD1.5 architecture" in problem.message and key in problem.message
    assert "Stable Diffusion 1.5 (859.5M)" in problem.message


def test_sd15_full_size_shapes_are_859_5m():
    from diffserve.engine.models.sd.published import _count_m, expected_ldm_shapes

    shapes = expected_ldm_shapes("sd15")
    unet = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    assert round(_count_m(unet), 1) == 859.5
    vega = {k: s for k, s in expected_ldm_shapes("segmind-vega").items() if k.startswith("model.diffusion_model.")}
    assert round(_count_m(vega), 1) == 745.2


def test_clip_vocabulary_from_the_shipped_bpe(tmp_path):
    from transformers import CLIPTokenizer

    from diffserve.engine.models.sd.published import local_config_dir

    tok = CLIPTokenizer.from_pretrained(local_config_dir("sd15", tmp_path) / "tokenizer")
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_materialize_is_cached_and_follows_the_inputs(tmp_path, demo_models):
    single = load_models_file(demo_models).entries["sd1.5-scifi"]["checkpoint"]
    copy = tmp_path / "scifi.safetensors"
    shutil.copy(single, copy)
    entry = {"checkpoint": copy}
    first = models_file.materialize("sd1.5-scifi", entry, tmp_path / "cache")
    assert (first / "unet" / "config.json").is_file()
    assert models_file.materialize("sd1.5-scifi", entry, tmp_path / "cache") == first
    copy.touch()  # a new download: a new fingerprint
    assert models_file.materialize("sd1.5-scifi", entry, tmp_path / "cache") != first


def test_models_check_cli_exit_codes(tmp_path, demo_models, capsys):
    from diffserve.api.cli import main

    assert main(["models", "check", "--models", str(demo_models)]) == 0
    assert "5 of 5 configured slugs complete" in capsys.readouterr().out
    text = demo_models.read_text().replace('checkpoint = "sd/Segmind-Vega"', 'checkpoint = "sd/gone"')
    broken = demo_models.parent / "broken.toml"
    broken.write_text(text)
    assert main(["models", "check", "--models", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "segmind-vega: INCOMPLETE (not served)" in out and "fix: download the segmind/Segmind-Vega" in out
