"""A repository built for ``--device cuda`` on this CPU host (written, not run): GPU instances spread over the
GPUs named, one copy of each slug's weights per GPU, each network's precision in the manifest and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffserve.engine.options import EngineOptions, network_precisions
from diffserve.export.repository import Deployment, RepositoryOptions, build_repository
from tests.export.test_repository import _model_config
from diffserve.triton_serving.manifest import read_manifest
from diffserve.triton_serving.stub_params import PipelineModelParams, instance_device


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory, tiny_checkpoints):
    repo = tmp_path_factory.mktemp("gpu-repo")
    slugs = ("sd1.5-scifi", "segmind-vega", "ominicontrol")
    deployments = [Deployment(s, tiny_checkpoints[s]) for s in slugs]
    # What `serve --models` / `export --models` choose on a CUDA host: torch, fused only, one instance per GPU.
    build_repository(repo, deployments, RepositoryOptions(runtime="torch", fused_runtime="torch", modes=("fused",),
                                                          device="cuda", gpus=(0, 1), pipeline_instances=1))
    return repo


def test_gpu_repository_spreads_one_fused_instance_per_slug_over_the_gpus(gpu_repository):
    manifest = read_manifest(gpu_repository)
    assert manifest["components"] == {}  # no component model: no second copy of any network
    assert sorted(manifest["pipelines"]) == ["ominicontrol", "sd1.5-scifi", "segmind-vega"]
    for name in manifest["pipelines"]:
        config = _model_config(gpu_repository / name / "config.pbtxt")
        groups = config["instance_group"]
        assert [(g["kind"], g["gpus"], g.get("count", 1)) for g in groups] == [("KIND_GPU", [0], 1),
                                                                               ("KIND_GPU", [1], 1)]
        assert manifest["pipelines"][name]["devices"] == ["cuda:0", "cuda:1"]
    assert not any((gpu_repository / d).is_dir() for d in ("sd1_5_scifi_unet", "segmind_vega_unet"))


def test_gpu_repository_records_each_networks_precision(gpu_repository):
    manifest = read_manifest(gpu_repository)
    sd = manifest["engine_options"]["sd1.5-scifi"]
    assert sd["precisions"]["unet"] == sd["precisions"]["text_encoder"] == "fp16"
    assert sd["precisions"]["vae_decoder"] == "fp32"  # force_upcast in the VAE config
    vega = manifest["engine_options"]["segmind-vega"]["precisions"]
    assert (vega["unet"], vega["text_encoder_2"], vega["vae_decoder"]) == ("fp16", "fp16", "fp32")
    flux = manifest["engine_options"]["ominicontrol"]
    assert flux["precision"] == "bf16"
    assert (flux["precisions"]["transformer"], flux["precisions"]["text_encoder_2"]) == ("bf16", "bf16")
    for slug, options in manifest["engine_options"].items():
        params = PipelineModelParams.from_model_config(_model_config(gpu_repository / slug / "config.pbtxt"))
        assert EngineOptions.from_dict(params.options) == EngineOptions.from_dict(options)
        assert options["device"] == "cuda"


def test_fp16_fix_vae_stays_fp16(tmp_path, sdxl_dir):
    fixed = tmp_path / "vega-fp16-fix"  # what network_precisions reads: the VAE config (madebyollin's fix)
    (fixed / "vae").mkdir(parents=True)
    config = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps(config | {"force_upcast": False}))
    names = ["unet", "vae_decoder"]
    assert network_precisions(sdxl_dir, "sdxl", names, "cuda") == {"unet": "fp16", "vae_decoder": "fp32"}
    assert network_precisions(fixed, "sdxl", names, "cuda") == {"unet": "fp16", "vae_decoder": "fp16"}
    assert network_precisions(fixed, "sdxl", names, "cpu") == {"unet": "fp32", "vae_decoder": "fp32"}


def test_instances_run_on_the_gpu_triton_gives_them():
    assert instance_device("cuda", {"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == "cuda:3"
    assert instance_device("cpu", {"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"


def test_engine_options_round_trip_and_refuse_what_they_do_not_know():
    options = EngineOptions(device="cuda", precisions={"unet": "fp16"}, ominicontrol_condition="cached", ort_threads=2)
    assert EngineOptions.from_json(options.to_json()) == options
    with pytest.raises(ValueError, match="unknown engine options"):
        EngineOptions.from_dict({"device": "cpu", "arena": True})
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precisions={"unet": "int8"})
    with pytest.raises(ValueError, match="ominicontrol_condition"):
        EngineOptions(ominicontrol_condition="bogus")


def test_a_fused_onnx_repository_has_no_directory_triton_would_take_for_a_model(tmp_path, sd15_dir):
    report = build_repository(tmp_path / "repo", [Deployment("sd1.5-scifi", sd15_dir)],
                              RepositoryOptions(modes=("fused",), pipeline_instances=1))
    assert report.components == {} and list(report.pipelines) == ["sd1.5-scifi"]
    models = [d for d in (tmp_path / "repo").iterdir() if d.is_dir()]
    assert [d.name for d in models] == ["sd1.5-scifi"] and (models[0] / "config.pbtxt").is_file()
    params = PipelineModelParams.from_model_config(_model_config(models[0] / "config.pbtxt"))
    assert params.artifacts and all(Path(p).is_file() and (models[0] / "artifacts") in Path(p).parents
                                     for p in params.artifacts.values())
