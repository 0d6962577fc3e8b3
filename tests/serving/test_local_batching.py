"""Concurrent requests through the real local backend share UNet calls and get their images alone.

The app runs with default job concurrency (``max_concurrent_jobs`` unset), so the job runner follows
the backend's batch capacity; three concurrent ``/v1`` requests (different seeds and step counts) must
be batched together by the checkpoint's ``StepBatcher`` and return the images the same requests return
one at a time.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest

from diffserve.api.app import create_app
from diffserve.api.backend_local import EngineBackend
from diffserve.api.settings import Settings
from diffserve.engine.batching import BatchingOptions
from tests.serving.test_api import ServerThread

REQUESTS = [{"prompt": f"city {i}", "seed": 10 + i, "num_inference_steps": 20 + i, "img_width": 512,
             "img_height": 512, "base64": True} for i in range(3)]  # the catalog's smallest


def _image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image"])
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_settings_choose_batching_and_the_runner_follows_the_batch_capacity(tmp_path):
    settings = Settings(data_dir=tmp_path, max_batch=4, batch_buckets="1,2,4")
    assert settings.batching_options() == BatchingOptions(max_batch=4, buckets=(1, 2, 4))
    backend = EngineBackend({}, batching=settings.batching_options())
    assert settings.job_concurrency(backend) == 4
    assert Settings(data_dir=tmp_path, max_concurrent_jobs=2).job_concurrency(backend) == 2
    assert Settings(data_dir=tmp_path, batching=False).batching_options() is None
    assert settings.job_concurrency(object()) == 1  # a backend without batch capacity
    with pytest.raises(ValueError, match="largest bucket"):
        Settings(data_dir=tmp_path, max_batch=8, batch_buckets=[1, 4])
    with pytest.raises(ValueError, match="increasing"):
        Settings(data_dir=tmp_path, batch_buckets=[4, 2, 8])


def test_concurrent_requests_are_batched_and_equal_their_images_alone(tiny_checkpoints, tmp_path):
    settings = Settings(data_dir=tmp_path, max_batch=8)
    backend = EngineBackend({"sd1.5-scifi": tiny_checkpoints["sd1.5-scifi"]}, batching=settings.batching_options())
    with ServerThread(create_app(settings, backend)) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        alone = [_image(http.post("/v1/sd1.5-scifi", json=body)) for body in REQUESTS]
        (runner,) = backend._runners.values()
        batcher = runner.batcher
        assert max(batcher.calls) == 2  # one CFG request at a time
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            together = list(pool.map(lambda body: _image(http.post("/v1/sd1.5-scifi", json=body)), REQUESTS))
        assert max(batcher.calls) > 2, batcher.calls  # requests shared UNet calls
    for a, b in zip(alone, together):
        # fp32 differences of 2e-4 at most flip a rare uint8 rounding, which JPEG (this slug's only
        # output format) spreads over its 8x8 block by a few grey levels
        assert np.abs(a - b).mean() < 0.05 and np.abs(a - b).max() <= 8
