"""Step-level batching served by Triton: the fused pipeline model takes many requests in flight.

Runs on the session's shared Triton server (``triton`` in conftest) and its demo repository, whose
fused pipeline models are built with batching on (the default): concurrent ``sd1.5-scifi`` requests
share UNet calls in one instance, each still gets its image alone (fp32 CPU, the README's 2e-4 for
reordered fp32 sums), its own progress, and its own cancellation. The model's ``INFO`` says how
many requests its largest UNet call held, so these tests fail if batching is silently off.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from diffserve.api.backend_triton import TritonBackend
from diffserve.api.settings import Settings
from diffserve.engine.catalog import validate
from diffserve.triton_serving.manifest import read_manifest

pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


MODEL = "sd1.5-scifi"
TOL = 2e-4  # README: reordered fp32 sums in a batched UNet call, SD1.5
REQUESTS = [  # different seeds, schedulers, step counts, guidance and sample counts; one resolution
    {"prompt": "futuristic city", "scheduler": "dpmpp_2m", "num_inference_steps": 20, "guidance_scale": 7.5,
     "seed": 11},
    {"prompt": "a red planet", "negative_prompt": "blurry", "scheduler": "DDIM", "num_inference_steps": 23,
     "guidance_scale": 3, "seed": 22, "samples": 2},
    {"prompt": "a spaceship", "scheduler": "Euler a", "num_inference_steps": 21, "guidance_scale": 1, "seed": 33},
    {"prompt": "neon streets", "scheduler": "UniPC", "num_inference_steps": 22, "guidance_scale": 5, "seed": 44},
]


def _params(body: dict) -> dict:
    return validate("sd1.5-scifi", body | {"img_width": 512, "img_height": 512})


@pytest.fixture(scope="module")
def backend(triton, demo_repository):
    return TritonBackend.from_repository(triton.grpc_url, demo_repository.repository)


async def _infer(backend, body: dict, request_id: str, progress: list):
    return await backend.infer(MODEL, _params(body), request_id=request_id, want_float=True,
                               on_progress=lambda done, total: progress.append((done, total)))


@pytest.fixture(scope="module")
def alone(backend):
    """Each request through Triton with nothing else in flight: a batch of one."""
    outputs = []
    for i, body in enumerate(REQUESTS):
        out = asyncio.run(_infer(backend, body, f"alone-{i}", []))
        assert out.info["batch"] == {"requests": 1, "rows": (2 if body["guidance_scale"] > 1 else 1)
                                     * body.get("samples", 1)}
        outputs.append(out)
    return outputs


def test_concurrent_requests_share_unet_calls_and_each_equals_its_image_alone(backend, alone):
    progress = [[] for _ in REQUESTS]

    async def together():
        return await asyncio.gather(*(_infer(backend, body, f"together-{i}", progress[i])
                                      for i, body in enumerate(REQUESTS)))

    outputs = asyncio.run(together())
    assert outputs[0].info["batching"] == {"max_batch": 8, "buckets": []}
    # Requests joined each other's UNet calls (all four arrive within milliseconds; 20-23 steps each).
    assert max(out.info["batch"]["requests"] for out in outputs) > 1, [out.info["batch"] for out in outputs]
    for body, out, ref, steps in zip(REQUESTS, outputs, alone, progress):
        assert out.seed == ref.seed == body["seed"]
        assert out.images.shape == ref.images.shape
        assert np.abs(out.images_float - ref.images_float).max() <= TOL, body
        n = body["num_inference_steps"]
        assert steps == [(k, n) for k in range(1, n + 1)], body  # its own progress, every step


def test_a_cancelled_request_leaves_the_others_in_its_batch_undisturbed(backend, alone):
    seen: list = []
    long = REQUESTS[0] | {"num_inference_steps": 100, "seed": 7}

    async def cancel_one():
        cancelled = asyncio.ensure_future(_infer(backend, long, "cancel-me", seen))
        others = [asyncio.ensure_future(_infer(backend, body, f"stay-{i}", []))
                  for i, body in enumerate(REQUESTS[1:], start=1)]
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return await asyncio.gather(*others)

    outputs = asyncio.run(cancel_one())
    assert len(seen) < 100
    assert max(out.info["batch"]["requests"] for out in outputs) > 1
    for out, ref in zip(outputs, alone[1:]):
        assert np.abs(out.images_float - ref.images_float).max() <= TOL
    # The instance is still serving: a request after the cancellation gets its image alone.
    again = asyncio.run(_infer(backend, REQUESTS[0], "after-cancel", []))
    assert np.abs(again.images_float - alone[0].images_float).max() <= TOL


def test_the_job_runner_keeps_the_batch_capacity_of_the_served_pipelines_in_flight(triton, demo_repository, tmp_path):
    pipelines = read_manifest(demo_repository.repository)["pipelines"]
    assert pipelines[MODEL]["batch_capacity"] == 8  # one instance, max_batch 8
    assert pipelines["omni-zero"]["batch_capacity"] == 8  # step-batched too (its controlnet_unet)
    assert pipelines["sd1.5-scifi__bls"]["batch_capacity"] == 1  # bls: one request per instance
    settings = Settings(data_dir=tmp_path)
    # The demo serves the step-batching fused models under the slugs' own names, as `serve --models` does.
    assert settings.job_concurrency(TritonBackend(triton.grpc_url, pipelines)) == 8
    assert Settings(data_dir=tmp_path, max_concurrent_jobs=3).job_concurrency(TritonBackend(triton.grpc_url, pipelines)) == 3
    bls = {name: info | {"default": info["mode"] == "bls"} for name, info in pipelines.items()}
    assert settings.job_concurrency(TritonBackend(triton.grpc_url, bls)) == 1
