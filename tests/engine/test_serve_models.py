"""`diffserve serve --models` with one slug whose artifacts are incomplete: the real command.

`serve` checks every slug of the models file, serves the complete ones and leaves the others out
with the reason on /readyz; a served slug generates, a left-out one is a 404 naming it.
"""

import base64
import io

import httpx
import numpy as np
import PIL.Image
import pytest

from tests.serving.processes import start_cli


pytestmark = pytest.mark.triton_server  # one Triton at a time under xdist (tests/conftest.py)


def test_serve_skips_incomplete_slug_and_readyz_names_it(tmp_path, tiny_checkpoints, diffserve_home):
    demo = diffserve_home / "checkpoints" / "published"
    models = tmp_path / "models.toml"
    models.write_text(f'["sd1.5-scifi"]\ncheckpoint = "{demo}/sd/missing.safetensors"\n'
                      f'["sd1.5-img2img"]\ncheckpoint = "{demo}/sd/stable-diffusion-v1-5"\n')
    log = tmp_path / "serve.log"
    proc, url = start_cli(["serve", "--backend", "local", "--models", str(models), "--port", "0", "--data-dir",
                           str(tmp_path / "api")], log)  # raises with the log's tail when serve did not start
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            body = client.get("/readyz").json()
            assert body["models"] == ["sd1.5-img2img"]
            assert "missing" in body["unavailable"]["sd1.5-scifi"][0]
            left_out = client.post("/v1/sd1.5-scifi", json={"prompt": "x"})
            assert left_out.status_code == 404 and "sd1.5-scifi" in left_out.json()["error"]
            buf = io.BytesIO()
            PIL.Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, format="JPEG")
            served = client.post("/v1/sd1.5-img2img", json={
                "image": base64.b64encode(buf.getvalue()).decode(), "prompt": "a lake", "strength": 0.1,
                "num_inference_steps": 20, "seed": 7, "img_width": 512, "img_height": 512})
            assert served.status_code == 200, served.text
            image = np.asarray(PIL.Image.open(io.BytesIO(served.content)))
            assert image.shape == (512, 512, 3) and image.std() > 0
    finally:
        proc.stop(60)
