"""The OpenAI images dialect through the official ``openai`` SDK: a real uvicorn server on loopback,
the in-process ``EngineBackend`` on the tiny checkpoints, ``images.generate`` and
``images.edit`` in both response formats, and the errors in OpenAI's shape (the SDK's own
exception classes read them). The Segmind routes of the same server keep their own error shape.
"""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from diffserve.api.app import create_app
from diffserve.api.backend_local import EngineBackend
from diffserve.api.settings import Settings
from tests.serving.test_api import ServerThread, decode_image, jpeg_bytes

KEY = "openai-key"
SCIFI_ONLY_KEY = "scifi-only-key"
SLUGS = ("sd1.5-scifi", "segmind-vega", "sd1.5-img2img")
CHEAP = {"seed": 7, "num_inference_steps": 20}
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def api(tiny_checkpoints, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("openai-data"), api_keys=[KEY, SCIFI_ONLY_KEY],
                        key_models={SCIFI_ONLY_KEY: ["sd1.5-scifi"]}, max_concurrent_jobs=1,
                        max_body_bytes=MAX_BODY)
    with ServerThread(create_app(settings, EngineBackend({s: tiny_checkpoints[s] for s in SLUGS}))) as server:
        yield server


@pytest.fixture()
def client(api):
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


def test_generate_b64_json_and_url_give_the_same_seeded_images(client, api):
    b64 = client.images.generate(model="sd1.5-scifi", prompt="a city", n=2, size="512x768",
                                 response_format="b64_json", extra_body=CHEAP)
    assert b64.created > 0 and len(b64.data) == 2
    images = [base64.b64decode(item.b64_json) for item in b64.data]
    assert decode_image(images[0]).size == (512, 768) and images[0] != images[1]

    urls = client.images.generate(model="sd1.5-scifi", prompt="a city", n=2, size="512x768",
                                  response_format="url", extra_body=CHEAP)
    assert [item.b64_json for item in urls.data] == [None, None]
    fetched = [httpx.get(item.url, timeout=30) for item in urls.data]  # served without a key
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/jpeg" for r in fetched)
    assert [r.content for r in fetched] == images  # same seed and parameters: the same images
    assert urls.data[0].url.startswith(f"{api.url}/v2/requests/")


def test_generate_defaults_url_and_the_slug_default_size(client):
    vega = client.images.generate(model="segmind-vega", prompt="a lighthouse", extra_body=CHEAP)
    [item] = vega.data
    assert decode_image(httpx.get(item.url, timeout=30).content).size == (1024, 1024)


def test_edit_takes_a_multipart_upload_with_strength_as_an_extension(client):
    upload = ("input.jpg", jpeg_bytes(), "image/jpeg")
    edited = client.images.edit(model="sd1.5-img2img", image=upload, prompt="a lake", size="512x512",
                                response_format="b64_json", extra_body={"strength": 0.1, **CHEAP})
    [item] = edited.data
    image = base64.b64decode(item.b64_json)
    assert decode_image(image).size == (512, 512)
    again = client.images.edit(model="sd1.5-img2img", image=upload, prompt="a lake", n=1,
                               extra_body={"strength": 0.1, **CHEAP})
    assert httpx.get(again.data[0].url, timeout=30).content == image


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors_are_in_openais_shape_with_the_field_at_fault(client, api):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.generate(model="dall-e-3", prompt="a cat")
    assert _error(unknown.value)["param"] == "model" and _error(unknown.value)["code"] == "model_not_found"
    assert "sd1.5-scifi" in _error(unknown.value)["message"]

    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.images.generate(model="sd1.5-img2img", prompt="a cat")
    assert _error(wrong_kind.value)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as edit_with_txt2img:
        client.images.edit(model="sd1.5-scifi", image=("a.jpg", jpeg_bytes()), prompt="a cat")
    assert _error(edit_with_txt2img.value)["param"] == "model"

    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(model="segmind-vega", prompt="a cat", size="512x512")
    assert _error(size.value)["param"] == "size" and "1024x1024" in _error(size.value)["message"]
    assert _error(size.value)["type"] == "invalid_request_error"
    for bad, param in (({"n": 9}, "n"), ({"response_format": "svg"}, "response_format"),
                       ({"prompt": ""}, "prompt"), ({"quality": "hd"}, "quality")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.images.generate(**{"model": "sd1.5-scifi", "prompt": "a cat", **bad})
        assert _error(exc.value)["param"] == param, bad
    with pytest.raises(openai.BadRequestError) as extension:  # an extension the catalog refuses
        client.images.generate(model="sd1.5-scifi", prompt="a cat", extra_body={"num_inference_steps": 5})
    assert "num_inference_steps" in _error(extension.value)["message"]
    with pytest.raises(openai.BadRequestError) as mask:
        client.images.edit(model="sd1.5-img2img", image=("a.jpg", jpeg_bytes()), mask=("m.png", b"x"), prompt="a")
    assert _error(mask.value)["param"] == "mask"
    with pytest.raises(openai.APIStatusError) as too_large:
        client.images.edit(model="sd1.5-img2img", image=("a.jpg", b"x" * MAX_BODY), prompt="a cat")
    assert too_large.value.status_code == 413 and _error(too_large.value)["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(model="sd1.5-img2img", image=("a.jpg", b"not an image"), prompt="a cat")
    assert _error(not_an_image.value)["type"] == "invalid_request_error"


def test_auth_is_the_api_key_check_in_openais_shape(api):
    missing = httpx.post(f"{api.url}/v1/images/generations", json={"model": "sd1.5-scifi", "prompt": "a cat"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as exc:
            wrong.images.generate(model="sd1.5-scifi", prompt="a cat")
    assert _error(exc.value)["type"] == "authentication_error"
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key=SCIFI_ONLY_KEY, max_retries=0) as limited:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            limited.images.generate(model="segmind-vega", prompt="a cat")
    assert _error(denied.value)["param"] == "model"
    # x-api-key works too, and the Segmind routes keep their own error shape.
    ok = httpx.post(f"{api.url}/v1/images/generations", headers={"x-api-key": KEY}, timeout=120,
                    json={"model": "sd1.5-scifi", "prompt": "a cat", "response_format": "b64_json", **CHEAP})
    assert ok.status_code == 200 and ok.headers["x-request-id"] and ok.headers["x-seed"] == "7"
    segmind = httpx.post(f"{api.url}/v1/sd1.5-scifi", json={"prompt": "a cat"})
    assert segmind.status_code == 401 and isinstance(segmind.json()["error"], str)
