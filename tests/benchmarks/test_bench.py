"""Every ``diffserve bench`` command on tiny models: the reports are complete and consistent.

No timing is asserted (this machine is shared and slow); what is checked is that each report
has every field, that its numbers agree with each other (p50 <= p90, a run's stages fit in its
total, ratio = ours / diffusers, Triton's request counts match ours), that ours and diffusers'
pipelines computed the same image, and the arithmetic of the floors and the capacity model.
The full-size configs are checked by parameter count on the meta device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from diffserve.benchmarks import capacity, floors, full_size
from diffserve.benchmarks.engine_bench import EngineBenchConfig, reference_request, run_engine_bench
from diffserve.benchmarks.index import results_index
from diffserve.benchmarks.report import render_markdown, write_report
from tests.devices import torch_components

# The catalog's smallest sd1.5-scifi request: 20 steps at 512x512 (about 2 s on two CPU cores).
SMALL = {"num_inference_steps": 20, "img_height": 512}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, tiny_checkpoints) -> Path:
    return tmp_path_factory.mktemp("bench-work")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


def _stats_ok(st: dict, n: int | None = None) -> None:
    assert st["min_ms"] <= st["median_ms"] <= st["p90_ms"] <= st["max_ms"]
    assert len(st["samples_ms"]) == st["n"] and (n is None or st["n"] == n)


def _written(report: dict, results_dir: Path) -> dict:
    paths = write_report(report, results_dir)
    assert paths["json"].is_file() and paths["markdown"].is_file()
    pngs = [p for k, p in paths.items() if k.startswith("plot")]
    assert pngs and all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    stored = json.loads(paths["json"].read_text())
    assert stored["kind"] == report["kind"] and stored["files"]["markdown"] == paths["markdown"].name
    env = stored["environment"]
    assert env["versions"]["torch"] and env["machine"]["cpu_count"] and "commit" in env["git"]
    assert paths["markdown"].read_text() == render_markdown(stored)
    return stored


# -- full-size architectures and floors --------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(full_size.EXPECTED_PARAMS_M))
def test_full_size_configs_have_the_published_parameter_counts(name):
    assert round(full_size.count_parameters(name) / 1e6, 1) == full_size.EXPECTED_PARAMS_M[name]


def test_every_config_is_checked_and_every_slug_architecture_exists():
    assert set(full_size.config_names()) == set(full_size.EXPECTED_PARAMS_M)
    for slug, arch in full_size.SLUG_ARCHITECTURES.items():
        assert set(arch.values()) <= set(full_size.EXPECTED_PARAMS_M), slug


def test_floors_reproduce_design_numbers_at_the_reference_requests():
    for slug in ("sd1.5-scifi", "sd1.5-img2img", "segmind-vega"):
        floor = floors.request_floor(slug, reference_request(slug))
        assert not floor.approximate
        assert floor.floor_ms == pytest.approx(floors.REQUEST_FLOOR_MS[slug], rel=0.03), slug
    assert floors.fraction_of_floor(100.0, 400.0, "cpu") is None
    assert floors.fraction_of_floor(100.0, 400.0, "cuda:0") == 0.25
    assert floors.unet_step_floor_ms("sd1.5-scifi", reference_request("sd1.5-scifi", SMALL)) == pytest.approx(2.0)
    assert "102 ms" in floors.floors_markdown()


def test_every_catalog_slug_has_its_familys_benchmark_figures_and_they_resolve():
    # The families hold the per-slug benchmark constants; benchmarks/ keeps no slug-keyed table of its own.
    from diffserve.benchmarks.figures import all_figures
    from diffserve.engine.catalog import CATALOG

    seen = set()
    for slug, family, fig in all_figures():
        assert CATALOG[slug].family is family and slug not in seen, slug
        seen.add(slug)
        assert set(family.denoiser_tflop) <= set(full_size.EXPECTED_PARAMS_M), family.name
        assert (fig.floor_denoiser in family.denoiser_tflop) if fig.floor_denoiser else fig.reference_steps, slug
        assert set(fig.full_size.values()) <= set(full_size.EXPECTED_PARAMS_M), slug
        assert fig.published is None or fig.published in floors.PUBLISHED_H100, slug
        assert fig.full_size_end_to_end != bool(fig.network_stages), slug
        if fig.network_stages:
            assert callable(family.module(fig.network_stages).network_stages), slug
    assert seen == set(CATALOG)


# -- engine ------------------------------------------------------------------------------------------

def _check_engine(report: dict, repeats: int) -> None:
    # Every engine bench here chooses device="cpu" explicitly: what it checks (TensorRT skipped, no
    # fraction of an H100 floor) is what a CPU run reports, on a CUDA host as here.
    assert report["kind"] == "engine" and report["settings"]["device"] == "cpu"
    assert report["floor"]["floor_ms"] > 0 and report["steps"] >= 1
    base = report["baseline"]
    assert base["name"] == "diffusers" and base["pipeline"].startswith("StableDiffusion")
    _stats_ok(base["end_to_end"], repeats)
    for rt in (r for r in report["runtimes"] if r["status"] == "ok"):
        ours = rt["end_to_end"]["ours"]
        _stats_ok(ours, repeats)
        for st in rt["stages"].values():
            _stats_ok(st)
        assert {"encode_text", "unet_step", "vae_decode", "image_encode"} <= set(rt["stages"])
        split = rt["end_to_end"]["pipeline_stages"]
        for i in range(repeats):
            parts = sum(split[k]["samples_ms"][i] for k in ("encode_text", "encode_image", "denoise", "decode")
                        if k in split)
            total = split["total"]["samples_ms"][i]
            # The stages are nested inside the pipeline's total, which is inside our wall clock.
            assert 0.5 * total <= parts <= total + 0.01
            assert total <= ours["samples_ms"][i] + 0.01
        assert split["denoise_per_step"]["median_ms"] == pytest.approx(
            split["denoise"]["median_ms"] / rt["steps"], rel=0.05)
        _check_loop_overhead(rt)
        assert rt["denoise_its"] == pytest.approx(1000 / split["denoise_per_step"]["median_ms"], rel=1e-3)
        assert rt["denoiser_its"] == pytest.approx(1000 / rt["stages"]["unet_step"]["median_ms"], rel=1e-3)
        assert rt["steps"] == report["steps"] and rt["images_per_request"] == report["request"]["samples"]
        assert rt["ratio_vs_diffusers"]["median"] == pytest.approx(
            ours["median_ms"] / base["end_to_end"]["median_ms"], rel=1e-3)
        assert rt["max_abs_diff_vs_diffusers"] <= 1e-3  # the same image, computed twice
        assert rt["fraction_of_floor"] is None  # CPU: no fraction of an H100 floor


def _check_loop_overhead(rt: dict) -> None:
    run = rt["loop_overhead_run"]
    assert run["steps"] == rt["steps"] and run["denoiser_calls"] == rt["steps"]  # one call per step (CFG batched)
    assert 0 <= run["denoiser_ms"] <= run["denoise_ms"]  # the calls happen inside the denoise stage
    assert rt["loop_overhead_per_step_ms"] == pytest.approx(
        (run["denoise_ms"] - run["denoiser_ms"]) / run["steps"], abs=2e-3)


def test_engine_bench_sd15_every_runtime(tiny_checkpoints, work_dir, results_dir):
    report = run_engine_bench(EngineBenchConfig(
        device="cpu",
        slug="sd1.5-scifi", runtimes=("torch", "onnxruntime", "tensorrt"), params=SMALL, warmup=0, repeats=2,
        stage_repeats=2, work_dir=work_dir, threads=1))
    status = {r["runtime"]: r["status"] for r in report["runtimes"]}
    assert status == {"torch": "ok", "onnxruntime": "ok", "tensorrt": "skipped"}
    assert "tensorrt" in report["runtimes"][2]["reason"]
    assert report["request"]["img_width"] == 512 and report["request"]["num_inference_steps"] == 20
    assert report["settings"]["torch_threads"] == 1
    _check_engine(report, 2)
    stored = _written(report, results_dir)
    md = Path(results_dir / stored["files"]["markdown"]).read_text()
    assert "| torch |" in md and "| onnxruntime |" in md and "skipped" in md and "diffusers" in md
    assert "it/s" in md and "SD1.5 512x512 UNet: 104.6 it/s" in md  # ours next to the published H100 figure


def test_engine_bench_img2img_and_vega(tiny_checkpoints, work_dir, results_dir):
    img2img = run_engine_bench(EngineBenchConfig(
        device="cpu",
        slug="sd1.5-img2img", params={"strength": 0.5}, warmup=0, repeats=1, stage_repeats=1, work_dir=work_dir,
        threads=1))
    _check_engine(img2img, 1)
    assert img2img["steps"] == 12 and "vae_encode" in img2img["runtimes"][0]["stages"]
    assert img2img["baseline"]["pipeline"] == "StableDiffusionImg2ImgPipeline"
    vega = run_engine_bench(EngineBenchConfig(
        device="cpu", slug="segmind-vega", params={"num_inference_steps": 20}, warmup=0, repeats=1, stage_repeats=1,
        work_dir=work_dir, threads=1))
    _check_engine(vega, 1)
    assert vega["baseline"]["pipeline"] == "StableDiffusionXLPipeline"
    _written(vega, results_dir)


def _tiny_configs(root: Path) -> Path:
    """The full-size config names filled with tiny configs: the full-size code path, in seconds."""
    from diffserve.engine.tiny.checkpoints import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, TEXT_ENCODER_CONFIG, VAE_CONFIG

    text = {**TEXT_ENCODER_CONFIG, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "model_type": "clip_text_model"}
    configs = {
        "clip_vit_l_text_encoder": {"_class_name": "CLIPTextModel", **text},
        "openclip_bigg_text_encoder": {"_class_name": "CLIPTextModelWithProjection", **text},
        "sd15_unet": {"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG},
        "sdxl_unet": {"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG},
        "segmind_vega_unet": {"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG},
        "sd_vae": {"_class_name": "AutoencoderKL", **VAE_CONFIG},
        "sdxl_vae": {"_class_name": "AutoencoderKL", **VAE_CONFIG, "force_upcast": True},
        "sdxl_controlnet": {"_class_name": "ControlNetModel", **{k: v for k, v in SDXL_UNET_CONFIG.items()
                                                                 if k not in ("up_block_types", "out_channels",
                                                                              "sample_size")},
                            "conditioning_embedding_out_channels": [8, 16, 16, 16]},
        "flux1_schnell_transformer": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4,
                                      "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                                      "num_attention_heads": 2, "joint_attention_dim": 32,
                                      "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6],
                                      "guidance_embeds": False},
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    return root


def test_engine_bench_full_size_path_on_tiny_configs(tmp_path, work_dir, results_dir):
    config_dir = _tiny_configs(tmp_path / "configs")
    report = run_engine_bench(EngineBenchConfig(
        device="cpu", slug="sd1.5-scifi", full_size=True, config_dir=config_dir, params=SMALL, warmup=1,
        eager_warmup=0, repeats=1, stage_repeats=1, work_dir=work_dir, threads=1,
        optimizations=("channels_last, fuse_qkv",)))
    assert report["settings"]["full_size"] and set(report["full_size"]["parameters_m"]) == {
        "text_encoder", "unet", "vae"}
    _check_engine(report, 1)
    eager, optimized = report["runtimes"]
    # warm-ups: the optimised entry's own (a compile, CUDA graphs), none for eager and diffusers (eager_warmup)
    assert report["settings"]["warmup"] == 1 and report["settings"]["eager_warmup"] == 0
    assert eager["warmup"]["runs_s"] == [] and len(optimized["warmup"]["runs_s"]) == 1
    assert "optimizations" not in eager and optimized["runtime"] == "torch"
    assert optimized["optimizations"] == report["settings"]["optimizations"][0] == "fuse_qkv,channels_last"
    info = optimized["optimization"]
    assert info["applied"]["unet"][0].startswith("fuse_qkv (") and info["applied"]["unet"][1] == "channels_last"
    assert info["fallbacks"] == [] and info["warmup_s"] == {}
    assert optimized["max_abs_diff_vs_eager"] <= 2e-4  # its own copy of the weights, the same image (reordered sums)
    stored = _written(report, results_dir)
    assert stored["full_size"]["configs"] == str(config_dir)
    md = render_markdown({**report, "files": {}})
    assert "| torch [fuse_qkv,channels_last] |" in md and "Loop overhead per step" in md


def test_full_size_checkpoint_loads_like_a_real_one(tmp_path):
    from diffserve.benchmarks.cli import main
    from diffserve.benchmarks.full_size import save_checkpoint

    config_dir = _tiny_configs(tmp_path / "configs")
    path = save_checkpoint("sd1.5-scifi", tmp_path / "ckpt", config_dir=config_dir)
    info = json.loads((path / "diffserve_full_size.json").read_text())
    assert info["random_weights"] and set(info["parameters_m"]) == {"text_encoder", "unet", "vae"}
    components = torch_components(path)  # the ordinary local-directory loading path
    assert components.config.family == "sd15" and components.config.vae_scale_factor == 8
    assert main(["checkpoint", "--slug", "ominicontrol", "--out", str(tmp_path / "no")]) == 2


@pytest.mark.parametrize("slug, stages", [
    ("omni-zero", {"encode_text", "unet_step", "controlnet_step", "vae_encode", "vae_decode", "image_encode"}),
    ("ominicontrol", {"transformer_step", "image_encode"}),
])
def test_engine_bench_networks_only_slugs_on_tiny_configs(tmp_path, work_dir, slug, stages):
    config_dir = _tiny_configs(tmp_path / "configs")
    report = run_engine_bench(EngineBenchConfig(device="cpu", slug=slug, full_size=True, config_dir=config_dir,
                                                warmup=0, repeats=1, stage_repeats=1, work_dir=work_dir, threads=1))
    (rt,) = report["runtimes"]
    assert rt["status"] == "ok" and set(rt["stages"]) == stages
    assert rt["end_to_end"]["estimated_ms"] > 0 and "estimate" in rt["end_to_end"]
    assert report["baseline"] is None and report["floor"]["floor_ms"] == floors.REQUEST_FLOOR_MS[slug]
    assert "(estimate)" in render_markdown({**report, "files": {}})


def test_engine_bench_ominicontrol_times_every_network_call(tiny_checkpoints, work_dir):
    # No diffusers pipeline computes OminiControl's request: stages come from instrumented runs.
    report = run_engine_bench(EngineBenchConfig(device="cpu", slug="ominicontrol", warmup=0, repeats=1, stage_repeats=1,
                                                work_dir=work_dir, threads=1))
    (rt,) = report["runtimes"]
    assert rt["status"] == "ok" and report["baseline"] is None and "baseline_note" in report
    assert {"transformer", "vae_decode", "image_encode"} <= set(rt["stages"])
    assert rt["stages"]["transformer"]["n"] == rt["steps"] == report["steps"] == 8
    assert rt["denoiser_its"] == pytest.approx(1000 / rt["stages"]["transformer"]["median_ms"], rel=1e-3)
    _check_loop_overhead(rt)
    _stats_ok(rt["end_to_end"]["ours"], 1)


# -- serving -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)
def test_serve_bench_api_and_triton_modes(tiny_checkpoints, work_dir, results_dir):
    import asyncio

    from diffserve.benchmarks.serve_bench import ServeBenchConfig, run_serve_bench

    # One Triton serves the API (--backend triton) and the direct bls/fused sweeps; img2img at
    # strength 0.1 runs 2 denoising steps, so the sweep stays short.
    cfg = ServeBenchConfig(slugs=("sd1.5-img2img",), device="cpu", start_server=True, server_backend="triton",
                           endpoints=("sync", "async"),
                           levels=(1, 2), requests_per_level=1, params={"strength": 0.1}, triton=True,
                           triton_runtime="torch", triton_pipeline_instances=1,  # no export, fewer stubs
                           engine_repeats=1, work_dir=work_dir, threads=1, poll_interval_s=0.02)
    report = asyncio.run(run_serve_bench(cfg))
    series = {(s["target"], s["endpoint"]): s for s in report["series"]}
    assert set(series) == {("api", "sync"), ("api", "async"), ("triton", "bls"), ("triton", "fused")}
    for (target, endpoint), s in series.items():
        assert s["steps"] == 2 and s["images_per_request"] == 1 and not s.get("warmup_errors")
        assert [lv["level"] for lv in s["levels"]] == [1, 2]
        for lv in s["levels"]:
            assert lv["requests"] == max(1, lv["level"]) and lv["ok"] == lv["requests"] and lv["errors"] == 0
            lat = lv["latency"]
            assert lat["min_ms"] <= lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
            assert lv["throughput_rps"] > 0 and lv["images_per_s"] == pytest.approx(lv["throughput_rps"])
            split = lv["split_ms_median"]
            assert split is not None and split["compute"] > 0, (target, endpoint)
            assert set(split) == {"api", "api_queue", "backend_queue", "compute", "image_encode"}
            tri = lv["triton"]  # the API's requests went through Triton too
            assert tri["count"] == lv["requests"], (target, endpoint)
            if target == "triton":
                assert tri["model"] == s["model"] and tri["count"] == lv["requests"]
                assert tri["compute_ms_per_request"] > 0
                if endpoint == "bls":  # the components ran as their own Triton models
                    assert any(name.endswith("_unet") for name in tri["other_models"])
    assert series[("triton", "fused")]["model"] == "sd1.5-img2img__fused"
    (mode_1, mode_2) = report["modes"]
    assert mode_1["fused_over_bls"] == pytest.approx(mode_1["fused_p50_ms"] / mode_1["bls_p50_ms"], rel=1e-3)
    base = report["engine_baseline"]["sd1.5-img2img/torch"]  # the repository runs torch (triton_runtime)
    assert base["steps"] == 2 and base["median_ms"] > 0 and base["runtime"] == "torch"
    assert len(report["overhead"]) == 4
    for o in report["overhead"]:
        assert o["overhead_ms"] == pytest.approx(o["served_p50_ms"] - o["engine_median_ms"], abs=1e-2)
        assert o["overhead_ms_per_step"] == pytest.approx(o["overhead_ms"] / 2, abs=1e-2)
        assert o["non_compute_ms"] >= 0
    stored = _written(report, results_dir)
    md = (results_dir / stored["files"]["markdown"]).read_text()
    assert "Serving overhead" in md and "bls vs fused" in md

    cap = capacity.capacity_report([results_dir / stored["files"]["json"]],
                                   capacity.CapacityInputs(slo_p95_ms=1e6, target_rps=10, gpu_hour_usd=2.0))
    assert len(cap["plans"]) == 4 and all(p["gpus_needed"] >= 1 for p in cap["plans"])
    _written(cap, results_dir)


# -- capacity and the results index --------------------------------------------------------------------

def _synthetic_serve_report() -> dict:
    levels = [  # concurrency, requests/s, p95 ms, errors
        (1, 2.0, 600.0, 0), (2, 3.5, 800.0, 0), (4, 5.0, 1400.0, 0), (8, 5.5, 2900.0, 1)]
    return {"kind": "serve", "schema_version": 1, "created_utc": "2025-01-01T00:00:00+00:00",
            "environment": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}},
            "series": [{"slug": "sd1.5-scifi", "target": "api", "endpoint": "sync", "images_per_request": 2,
                        "levels": [{"level": c, "throughput_rps": rps, "requests": 16, "errors": err,
                                    "latency": {"p95_ms": p95}} for c, rps, p95, err in levels]}]}


def test_capacity_math_on_a_synthetic_sweep():
    (curve,) = capacity.curves_from_report(_synthetic_serve_report())
    inputs = capacity.CapacityInputs(slo_p95_ms=1500, target_rps=12, gpu_hour_usd=3.0)
    p = capacity.plan(curve["points"], curve["images_per_request"], inputs)
    assert p["level"] == 4 and p["rps_per_gpu"] == 5.0 and p["images_per_s_per_gpu"] == 10.0
    assert p["gpus_needed"] == 3 and p["utilisation"] == pytest.approx(12 / 15)
    assert p["usd_per_1000_images"] == pytest.approx(3.0 / (3600 * 10.0) * 1000, rel=1e-4)
    assert p["usd_per_1000_images_at_peak"] == pytest.approx(3.0 / (3600 * 11.0) * 1000, rel=1e-4)
    # Level 8 is fastest but had an error: tolerated only when asked.
    lenient = capacity.plan(curve["points"], 2, capacity.CapacityInputs(3000, 12, 3.0, max_error_rate=0.1))
    assert lenient["level"] == 8 and lenient["gpus_needed"] == math.ceil(12 / 5.5)
    # Two GPUs behind the measured server halve the per-GPU rate.
    two = capacity.plan(curve["points"], 2, capacity.CapacityInputs(1500, 12, 3.0, gpus_per_server=2))
    assert two["rps_per_gpu"] == 2.5 and two["gpus_needed"] == 5
    tight = capacity.plan(curve["points"], 2, capacity.CapacityInputs(500, 12, 3.0))
    assert tight["gpus_needed"] is None and "infeasible" in tight["reason"]
    with pytest.raises(ValueError):
        capacity.CapacityInputs(slo_p95_ms=0, target_rps=1, gpu_hour_usd=1)


def test_capacity_from_an_engine_report_is_one_point():
    report = {"kind": "engine", "environment": {"gpu": None}, "settings": {"slug": "segmind-vega"},
              "request": {"samples": 1},
              "runtimes": [{"runtime": "torch", "status": "ok",
                            "end_to_end": {"ours": {"median_ms": 250.0, "p90_ms": 260.0, "n": 5}}}]}
    (curve,) = capacity.curves_from_report(report)
    p = capacity.plan(curve["points"], 1, capacity.CapacityInputs(300, 10, 2.0))
    assert p["rps_per_gpu"] == 4.0 and p["gpus_needed"] == 3 and p["p95_ms"] == 260.0


def test_cli_commands_and_results_index(tmp_path, capsys):
    import shutil

    from diffserve.benchmarks.cli import main

    # capacity and report read the committed reports (CPU and H200 engine runs of both SD slugs), copied
    # into a directory of the test's own: the test runs alone or in any order.
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    for report in Path(__file__).resolve().parents[2].joinpath("benchmarks", "results").glob("engine-*.json"):
        shutil.copy(report, results_dir)
    assert main(["capacity", "--results-dir", str(results_dir), "--slo-p95-ms", "100000", "--target-rps", "5",
                 "--gpu-hour-usd", "2.5", "--out", str(results_dir), "--no-plots"]) == 0
    assert "$ / 1000 images" in capsys.readouterr().out
    assert main(["report", "--results-dir", str(results_dir), "--write"]) == 0
    index = (results_dir / "README.md").read_text()
    assert "`sd1.5-scifi`" in index and "`segmind-vega`" in index and "Compute floors" in index
    assert results_index(results_dir) in index
    assert main(["engine", "--slug", "no-such-model"]) == 2


# -- the load generator's logic, without a server ---------------------------------------------------------

def test_load_shapes_and_level_summary_on_a_fake_endpoint():
    import asyncio
    import random

    from diffserve.benchmarks.serve_bench import Record, closed_loop, open_loop, request_split, summarize_level

    in_flight, peak = 0, 0

    async def send(scheduled: float, t_zero: float) -> Record:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        rec = Record(True, "200", 0.05, scheduled - t_zero, "id")
        rec.metrics = {"inference_time": 0.03, "queue_time": 0.005, "backend_queue_time": 0.002, "encode_time": 0.001}
        return rec

    records, elapsed = asyncio.run(closed_loop(send, 3, 7, 0.0))
    assert len(records) == 7 and peak == 3 and elapsed > 0
    peak = 0
    records, _ = asyncio.run(open_loop(send, 200.0, 10, 0.0, random.Random(0)))
    assert len(records) == 10 and sorted(r.start_s for r in records) == [r.start_s for r in records]
    split = request_split(records[0])
    assert split["api"] == pytest.approx(50 - 5 - 2 - 30) and split["image_encode"] == pytest.approx(1)
    records.append(Record(False, "500", 0.01, 0.0, error="boom"))
    level = summarize_level(4, records, 2.0, images_per_request=2)
    assert level["ok"] == 10 and level["errors"] == 1 and level["error_kinds"] == {"500": 1}
    assert level["throughput_rps"] == 5.0 and level["images_per_s"] == 10.0
    assert level["latency"]["p50_ms"] == pytest.approx(50) and level["non_compute_ms_median"] == pytest.approx(20)


def test_serve_config_checks_and_which_checkpoints_the_baseline_uses(tiny_checkpoints):
    from diffserve.benchmarks.serve_bench import ServeBenchConfig, _served_checkpoints

    with pytest.raises(ValueError, match="nothing to load"):
        ServeBenchConfig()
    with pytest.raises(ValueError, match="endpoint"):
        ServeBenchConfig(start_server=True, endpoints=("websocket",))
    with pytest.raises(ValueError, match="integers"):
        ServeBenchConfig(start_server=True, levels=(1.5,))
    assert _served_checkpoints(ServeBenchConfig(start_server=True)) == tiny_checkpoints
    assert _served_checkpoints(ServeBenchConfig(url="http://127.0.0.1:1")) is None
    assert _served_checkpoints(ServeBenchConfig(triton=True, triton_repository=Path("r"))) is None
    own = {"sd1.5-scifi": Path("/models/sd15")}
    assert _served_checkpoints(ServeBenchConfig(start_server=True, server_checkpoints=own)) == own
    with pytest.raises(ValueError, match="fused variants"):
        ServeBenchConfig(triton=True, fused_variants=("batched", "fast"))
    ServeBenchConfig(triton=True, fused_variants=("batched", "unbatched", "unbatched-x2"))


def test_fused_variant_rows_compare_each_level_with_unbatched_and_with_its_lowest_level():
    from diffserve.benchmarks.serve_bench import variant_rows

    def series(endpoint, images_per_s, batch=None):
        return {"slug": "sd1.5-scifi", "target": "triton", "endpoint": endpoint, "levels": [
            {"level": lv, "images_per_s": ips, "latency": {"p50_ms": 1000.0 * lv, "p95_ms": 1200.0 * lv}}
            | ({"batch_requests_mean": batch[i]} if batch else {}) for i, (lv, ips) in enumerate(images_per_s)]}

    rows = variant_rows([series("bls", [(1, 0.5)]), series("fused-unbatched", [(1, 0.5), (8, 0.6)]),
                         series("fused-batched", [(1, 0.5), (8, 1.2)], batch=[1.0, 7.5])])
    batched = [r for r in rows if r["variant"] == "batched"]
    assert [(r["level"], r["vs_lowest_level"], r["vs_unbatched"], r["batch_requests_mean"]) for r in batched] == [
        (1, 1.0, 1.0, 1.0), (8, 2.4, 2.0, 7.5)]
    assert len(rows) == 4  # bls is not a fused variant


def test_engine_bench_checks_low_precision_against_eager_fp32(tiny_checkpoints, work_dir):
    # One runtime: bf16 convolutions run ~6x slower than fp32 on a CPU without native bf16, and the
    # optimized entries' comparison with eager is the fp32 test above.
    report = run_engine_bench(EngineBenchConfig(
        device="cpu",
        slug="sd1.5-scifi", precision="bf16", params=SMALL, warmup=0, repeats=1, stage_repeats=1, baseline=False,
        work_dir=work_dir, threads=1, fp32_reference=True))
    assert report["settings"]["precision"] == "bf16" and report["fp32_reference"]
    [eager] = report["runtimes"]
    assert 0 < eager["max_abs_diff_vs_fp32"] < 0.1  # bf16 compute: close to fp32, not equal
    assert "Max abs pixel difference from eager fp32" in render_markdown({**report, "files": {}})
