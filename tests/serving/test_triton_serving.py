"""A real Triton server, started from the exported demo repository, serves every slug.

The server (``triton`` in conftest, shared with the API tests) runs in explicit model-control
mode so tests can unload a component model (a real component failure) and reload a model with
an overridden config.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from diffserve.api.backend import BackendUnavailable
from diffserve.api.backend_triton import TritonBackend
from diffserve.engine.catalog import validate
from diffserve.export.repository import TRITON_SLUGS
from diffserve.engine.pipelines import run
from diffserve.engine.models.omni_zero.tiny import synthetic_portrait
from tests.devices import torch_components

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


TOL = 1e-4


@pytest.fixture(scope="module")
def repository(demo_repository):
    return demo_repository


@pytest.fixture(scope="module")
def backend(triton, repository):
    return TritonBackend.from_repository(triton.grpc_url, repository.repository)


@pytest.fixture(scope="module")
def client(triton):
    return grpcclient.InferenceServerClient(triton.grpc_url)


@pytest.fixture(scope="module")
def engine_components(tiny_checkpoints):
    return {slug: torch_components(tiny_checkpoints[slug], device="cpu") for slug in TRITON_SLUGS}


def request_params(slug: str, image: np.ndarray) -> dict:
    payloads = {
        "sd1.5-scifi": {"prompt": "futuristic city", "negative_prompt": "blurry", "scheduler": "dpmpp_2m",
                        "guidance_scale": 5, "samples": 2, "seed": 516797155652, "img_width": 512,
                        "img_height": 768},
        "sd1.5-img2img": {"image": "<tensor>", "prompt": "a fantasy landscape", "scheduler": "DDIM",
                          "guidance_scale": 10.5, "strength": 0.75, "seed": 98877465625},
        "segmind-vega": {"prompt": "portrait", "scheduler": "UniPC", "num_inference_steps": 20,
                         "guidance_scale": 9, "seed": 1232788698},
        "omni-zero": {"prompt": "A person", "negative_prompt": "blurry", "seed": 42, "number_of_steps": 4,
                      "base_image": "<tensor>", "style_image": "<tensor>", "identity_image": "<tensor>",
                      "composition_image": "<tensor>", "guidance_scale": 3, "base_image_strength": 0.15},
        "ominicontrol": {"image": "<tensor>", "prompt": "a sofa in a living room", "steps": 4, "seed": 12467},
    }
    params = validate(slug, payloads[slug])
    if slug == "omni-zero":
        portraits = {"identity": synthetic_portrait(96, 128), "style": synthetic_portrait(128, 128, shade=40),
                     "base": synthetic_portrait(96, 128, shade=-20), "composition": synthetic_portrait(128, 96, shade=20)}
        params.update({f"{k}_image": v for k, v in portraits.items()})
    elif "image" in params:
        params["image"] = image
    return params


@pytest.fixture(scope="module")
def big_image():
    y, x = np.mgrid[0:512, 0:512]
    return np.stack([x // 2, y // 2, (x + y) // 4], axis=-1).astype(np.uint8)


def test_exported_onnx_components_match_torch(repository):
    assert repository.components, "no component models were exported"
    for name, info in repository.components.items():
        assert info.get("artifact"), f"{name}: the demo repository serves every component from ONNX"
        diff = info["max_abs_diff"]
        if info.get("skipped"):
            # A cached artifact (same fingerprint: same weights and export settings): its parity was
            # measured when it was exported and is kept in the record beside it.
            artifact = repository.repository / name / "1" / info["artifact"]
            diff = json.loads(artifact.with_suffix(".json").read_text())["max_abs_diff"]
        assert diff is not None and diff <= TOL, (name, info)


@pytest.mark.parametrize("slug", TRITON_SLUGS)
def test_triton_serves_every_slug_equal_to_the_engine_in_both_modes(slug, backend, engine_components, big_image):
    params = request_params(slug, big_image)
    reference = run(slug, dict(params), engine_components[slug])
    outputs = {}
    for model in (f"{slug}__bls", slug):
        steps = []
        out = asyncio.run(backend.infer(model, dict(params), request_id=f"t-{model}", want_float=True,
                                        on_progress=lambda d, t: steps.append((d, t))))
        assert out.seed == reference.seed
        assert out.images.shape == reference.images.shape and out.images.dtype == np.uint8
        assert np.abs(out.images_float - reference.images).max() <= TOL, model
        assert steps[-1] == (reference.steps, reference.steps) and len(steps) == reference.steps
        assert out.info["mode"] == ("bls" if model.endswith("__bls") else "fused")  # the slug's own name: fused
        outputs[model] = out
    bls, fused = outputs.values()
    assert np.abs(bls.images_float - fused.images_float).max() <= TOL


def _unet_stats(client, model="tiny_sd15_unet"):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), batches


def test_concurrent_requests_share_unet_batches(backend, client, big_image):
    # Two pipelines stepping in lock-step only meet in one UNet batch when the batcher waits
    # about one step for a partner; reload the UNet with that delay for this test, then restore.
    # The shared repository runs one instance per pipeline model: give sd1.5-scifi a second one.
    model = "tiny_sd15_unet"
    original = client.get_model_config(model, as_json=True)["config"]
    patched = json.loads(json.dumps(original))
    patched["dynamic_batching"]["max_queue_delay_microseconds"] = "300000"
    client.load_model(model, config=json.dumps(patched))
    pipeline = client.get_model_config("sd1.5-scifi__bls", as_json=True)["config"]
    two = json.loads(json.dumps(pipeline))
    two["instance_group"][0]["count"] = 2
    client.load_model("sd1.5-scifi__bls", config=json.dumps(two))
    try:
        before = _unet_stats(client)
        params = request_params("sd1.5-scifi", big_image) | {"samples": 1, "img_height": 512}

        async def both():
            return await asyncio.gather(*(backend.infer("sd1.5-scifi__bls", dict(params, seed=s), request_id=f"c{s}")
                                          for s in (1, 2)))

        first, second = asyncio.run(both())
        assert len(first.images) == 1 and len(second.images) == 1
        assert not np.array_equal(first.images[0], second.images[0])
        after = _unet_stats(client)
        assert after[0] - before[0] == 2 * 2 * 20  # 2 requests x CFG pair x 20 steps
        assert after[1] - before[1] < 2 * 20  # fewer executions than UNet requests: steps were batched
        grown = {b: n - before[2].get(b, 0) for b, n in after[2].items()}
        assert grown.get(4, 0) > 0  # a batch of 4 = both requests' CFG pairs together
    finally:
        client.load_model(model, config=json.dumps(original))
        client.load_model("sd1.5-scifi__bls", config=json.dumps(pipeline))


def test_fused_torch_pipeline_runs_optimized_components_compiled_at_load(backend, client, engine_components,
                                                                          big_image):
    # The demo repository's fused models run ONNX Runtime; reload one on torch with optimizations.
    model = "sd1.5-scifi"
    original = client.get_model_config(model, as_json=True)["config"]
    patched = json.loads(json.dumps(original))
    spec = "fuse_qkv,channels_last,compile,device_scheduler,components=vae_decoder"
    options = json.loads(patched["parameters"]["options"]["string_value"]) | {"torch_optimizations": spec}
    patched["parameters"].update(fused_runtime={"string_value": "torch"}, options={"string_value": json.dumps(options)})
    client.load_model(model, config=json.dumps(patched))
    try:
        params = request_params("sd1.5-scifi", big_image) | {"samples": 1, "img_height": 512}
        reference = run("sd1.5-scifi", dict(params), engine_components["sd1.5-scifi"])
        out = asyncio.run(backend.infer(model, dict(params), request_id="opt", want_float=True))
        assert np.abs(out.images_float - reference.images).max() <= 2e-4  # as tests/engine/test_torch_optimize.py
        opts = out.info["torch_optimizations"]
        assert opts["spec"] == spec and opts["applied"]["unet"] == ["fuse_qkv (8 attentions)", "channels_last"]
        assert opts["applied"]["vae_decoder"] == ["channels_last", "compile=default"]
        assert set(opts["warmup_s"]) == {"vae_decoder"}  # compiled while Triton loaded the model
        assert opts["applied"]["denoise_loop"] == ["device_scheduler"]
    finally:
        client.load_model(model, config=json.dumps(original))


def test_cancelled_request_stops_between_steps(backend, client, big_image):
    params = request_params("sd1.5-scifi", big_image) | {"samples": 1, "img_height": 512, "num_inference_steps": 100}
    before = _unet_stats(client)[0]
    seen = []

    async def cancel_after_three():
        task = asyncio.ensure_future(backend.infer("sd1.5-scifi__bls", params, request_id="cancel-me",
                                                   on_progress=lambda d, t: seen.append(d)))
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_three())
    last = -1
    for _ in range(60):  # wait until the UNet count stops moving (the in-flight step finished)
        now = _unet_stats(client)[0]
        if now == last:
            break
        last = now
        time.sleep(0.5)
    steps_run = (_unet_stats(client)[0] - before) // 2
    assert 3 <= steps_run <= len(seen) + 2, (steps_run, len(seen))  # stopped within a step of noticing
    assert steps_run < 100


def test_failing_component_gives_an_error_response_and_the_next_request_succeeds(backend, client, big_image):
    params = request_params("sd1.5-scifi", big_image) | {"samples": 1, "img_height": 512}
    client.unload_model("tiny_sd15_unet")
    try:
        with pytest.raises(BackendUnavailable) as info:
            asyncio.run(backend.infer("sd1.5-scifi__bls", dict(params), request_id="no-unet"))
        assert "tiny_sd15_unet" in str(info.value)
        assert client.is_model_ready("sd1.5-scifi__bls")  # the pipeline model survived
    finally:
        client.load_model("tiny_sd15_unet")
    out = asyncio.run(backend.infer("sd1.5-scifi__bls", dict(params), request_id="after"))
    assert len(out.images) == 1


def _stream_error(triton, model: str, request: bytes | None, images: dict[str, np.ndarray]) -> str:
    """Send raw tensors to a decoupled pipeline model; the message of its error response."""
    import queue

    inputs = []
    if request is not None:
        inputs.append(grpcclient.InferInput("REQUEST", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([request], dtype=np.object_))
    for name, pixels in images.items():
        inputs.append(grpcclient.InferInput(name, list(pixels.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(pixels)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put(error))
    try:
        client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("IMAGES")])
        error = answers.get(timeout=120)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None, f"{model} served a malformed request"
    return str(error)


def test_malformed_requests_are_rejected_by_the_pipeline_model(triton, big_image):
    """The model trusts the API's validation, not the wire: it refuses what cannot be a validated request."""
    from diffserve.engine.request import GenerationRequest

    params = request_params("sd1.5-img2img", big_image[:64, :64])
    payload, images = GenerationRequest.from_params("sd1.5-img2img", params).encode()
    body = json.loads(payload)
    cases = [
        (b"{not json", images, "REQUEST is not JSON"),
        (json.dumps(body | {"params": body["params"] | {"bogus": 1}}).encode(), images, "unknown parameter(s) 'bogus'"),
        (json.dumps(body | {"slug": "sd1.5-scifi"}).encode(), images, "this model serves 'sd1.5-img2img'"),
        (payload, {"image": np.zeros((0, 64, 3), np.uint8)}, "'image' must be a uint8 [H, W, 3] array with H, W > 0"),
    ]
    for request, tensors, message in cases:
        error = _stream_error(triton, "sd1.5-img2img", request, tensors)
        assert "invalid request:" in error and message in error, error
    assert "REQUEST" in _stream_error(triton, "sd1.5-img2img", None, images)  # Triton's own check: not optional


def test_images_that_are_not_uint8_hw3_are_refused_before_sending(backend, big_image):
    from diffserve.api.backend import InputRejected

    params = request_params("sd1.5-img2img", big_image)
    for image in (big_image.astype(np.float32), np.dstack([big_image, big_image[..., :1]])):
        with pytest.raises(InputRejected, match=r"'image' must be a uint8 \[H, W, 3\] array"):
            asyncio.run(backend.infer("sd1.5-img2img", params | {"image": image}, request_id="bad-image"))
    with pytest.raises(InputRejected, match="missing parameter"):  # an unvalidated request cannot be sent
        asyncio.run(backend.infer("sd1.5-scifi", {"prompt": "x", "samples": 9}, request_id="bad"))


def test_portrait_without_a_face_is_rejected_as_invalid_input(backend, big_image):
    from diffserve.api.backend import InputRejected

    params = request_params("omni-zero", big_image) | {"identity_image": np.full((128, 96, 3), 90, np.uint8)}
    for model in ("omni-zero__bls", "omni-zero"):
        with pytest.raises(InputRejected) as info:
            asyncio.run(backend.infer(model, dict(params), request_id=f"noface-{model}"))
        assert "face" in str(info.value).lower()


def test_unbatched_face_detector_is_served_whole(client, repository):
    config = client.get_model_config("tiny_omni_zero_face_detector", as_json=True)["config"]
    assert int(config.get("max_batch_size", 0)) == 0 and "dynamic_batching" not in config
    assert [int(d) for d in config["input"][0]["dims"]] == [1, 3, 640, 640]
    assert repository.components["tiny_omni_zero_face_detector"]["max_abs_diff"] == 0.0  # a renamed copy


def test_readiness_reports_every_slug(backend):
    status = asyncio.run(backend.ready())
    assert status["server"] is True
    assert all(status[slug] for slug in TRITON_SLUGS)


def test_a_stub_whose_exit_handlers_hang_still_unloads(repository, tmp_path):
    """Triton waits for a model's process without a limit when it unloads the model; a process
    blocked in a C-level exit handler would hold the unload (and Triton's shutdown) for ever. The
    templates end their process before those handlers run."""
    import shutil

    from diffserve.triton_serving.server import TritonServer, TritonServerConfig

    name = "tiny_sd15_vae_decoder"
    repo = tmp_path / "repo"
    shutil.copytree(repository.repository / name, repo / name)
    model_py = repo / name / "1" / "model.py"
    # libc's exit() would call pause() after the interpreter is gone: it never returns.
    model_py.write_text(model_py.read_text() + "\n\nimport ctypes\n\n_libc = ctypes.CDLL(None)\n"
                        "_libc.__cxa_atexit(ctypes.cast(_libc.pause, ctypes.c_void_p), None, None)\n")
    log = tmp_path / "triton.log"
    server = TritonServer(TritonServerConfig(repository=repo, model_control_mode="explicit", load_models=[name],
                                             log_file=log, startup_timeout_s=300))
    with server:
        grpcclient.InferenceServerClient(server.grpc_url).unload_model(name)
        deadline = time.monotonic() + 120
        while f"successfully unloaded '{name}'" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
