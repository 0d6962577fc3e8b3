"""The memory plan's weights come from file headers and equal parameter counts x served dtype sizes of the
full-size configs (SD1.5 UNet 859.5M, Vega UNet 745.2M, SDXL UNet 2567.5M, FLUX transformer 11.9B)."""

from __future__ import annotations

import json
import struct

import pytest

from diffserve.benchmarks.full_size import EXPECTED_PARAMS_M, build_module, load_config
from diffserve.engine.memory_plan import GB, DevicePlan, plan_deployment, plan_slug, safetensors_params

_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def _header_only_safetensors(path, module, dtype="fp32"):
    """A safetensors file of the module's tensors with a real header and sparse (unwritten) data."""
    header, offset = {}, 0
    for name, tensor in module.state_dict().items():
        size = tensor.numel() * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return sum(t.numel() for t in module.state_dict().values())


def _skeleton(root, networks, vae_config=None):
    for sub, (config, dtype) in networks.items():
        _header_only_safetensors(root / sub / "diffusion_pytorch_model.safetensors", build_module(config, "meta"), dtype)
    if vae_config is not None:
        (root / "vae").mkdir(parents=True, exist_ok=True)
        (root / "vae" / "config.json").write_text(json.dumps(vae_config))
    return root


@pytest.mark.parametrize("slug, config, served", [
    ("sd1.5-scifi", "sd15_unet", "fp16"),
    ("segmind-vega", "segmind_vega_unet", "fp16"),
    ("omni-zero", "sdxl_unet", "fp16"),
    ("ominicontrol", "flux1_schnell_transformer", "bf16"),
])
def test_weights_are_parameter_counts_times_the_served_dtype(tmp_path, slug, config, served):
    sub = "transformer" if "flux" in config else "unet"
    _skeleton(tmp_path, {sub: (config, "fp32")})
    plan = plan_slug(slug, tmp_path, "cuda")
    (network,) = plan.weights
    assert round(network.params / 1e6, 1) == EXPECTED_PARAMS_M[config]
    assert (network.precision, network.bytes) == (served, network.params * 2)
    assert plan.weights_by_precision() == {served: network.params * 2}
    assert plan.total_bytes == network.bytes + plan.activation_bytes + plan.overhead_bytes


def test_sdxl_vae_is_planned_in_fp32_where_forced(tmp_path):
    vae_config = {k: v for k, v in load_config("sdxl_vae").items() if k != "_source"}
    _skeleton(tmp_path, {"vae": ("sdxl_vae", "fp16")}, vae_config | {"force_upcast": True})
    (vae,) = plan_slug("segmind-vega", tmp_path, "cuda").weights
    assert (vae.precision, vae.bytes) == ("fp32", vae.params * 4)
    assert safetensors_params(tmp_path / "vae" / "diffusion_pytorch_model.safetensors") == {"F16": vae.params}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vae_config | {"force_upcast": False}))
    assert plan_slug("segmind-vega", tmp_path, "cuda").weights[0].precision == "fp16"


def test_a_deployment_that_does_not_fit_names_what_to_move(tmp_path):
    _skeleton(tmp_path / "flux", {"transformer": ("flux1_schnell_transformer", "bf16")})
    _skeleton(tmp_path / "sd", {"unet": ("sd15_unet", "fp32")})
    checkpoints = {"ominicontrol": tmp_path / "flux", "sd1.5-scifi": tmp_path / "sd"}
    big = plan_deployment(checkpoints, 141)
    assert big.fits and "fits" in big.format()
    small = plan_deployment(checkpoints, 20)
    assert not small.fits
    text = small.format()
    assert "does NOT fit" in text and "serve ominicontrol from another GPU" in text
    assert isinstance(small, DevicePlan) and small.total_bytes > 20 * GB


def test_models_check_prints_the_plan_and_export_refuses_what_does_not_fit(tmp_path, diffserve_home, capsys):
    from diffserve.api.cli import main
    from diffserve.engine.tiny.demo import demo_models_file
    from diffserve.triton_serving.manifest import read_manifest

    models = demo_models_file()
    assert main(["models", "check", "--models", str(models), "--device", "cuda", "--gpu-memory-gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per GPU" in out and ": fits" in out and "ominicontrol: weights" in out
    assert main(["models", "check", "--models", str(models), "--device", "cuda", "--gpu-memory-gb", "4"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    repo = tmp_path / "repo"
    assert main(["export", "--models", str(models), "--device", "cuda", "--gpus", "0,1", "--gpu-memory-gb", "4",
                 "--repository", str(repo)]) == 2
    assert "does not fit the GPU" in capsys.readouterr().err and not (repo / "repository.json").exists()
    assert main(["export", "--models", str(models), "--device", "cuda", "--gpus", "0,1",
                 "--ominicontrol-condition", "cached", "--repository", str(repo)]) == 0
    manifest = read_manifest(repo)
    assert manifest["components"] == {} and {p["mode"] for p in manifest["pipelines"].values()} == {"fused"}
    assert all(p["devices"] == ["cuda:0", "cuda:1"] for p in manifest["pipelines"].values())
    assert manifest["engine_options"]["ominicontrol"]["ominicontrol_condition"] == "cached"
    assert manifest["engine_options"]["ominicontrol"]["precisions"]["transformer"] == "bf16"
