"""``diffserve.engine.pipelines.run``: the catalog maps a request onto ``generate``; images arrive as uint8 arrays."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffserve.engine.pipelines
from diffserve.engine.models import SD
from diffserve.engine.catalog import CATALOG, RESPONSE_PARAMS, InvalidRequest, ModelSpec, Param, ParamType, get_model, validate
from diffserve.engine.pipelines import RunControl, pipeline_module, run
from diffserve.engine.pipelines.common import image_to_tensor

REQUESTS = {
    "sd1.5-scifi": {"prompt": "city", "samples": 2, "img_width": 768},
    "sd1.5-img2img": {"image": "x", "prompt": "landscape", "strength": 0.5},
    "segmind-vega": {"prompt": "portrait", "negative_prompt": "blurry"},
    "omni-zero": {"identity_image": "x", "style_image": "y", "number_of_steps": 7},
    "ominicontrol": {"image": "x", "prompt": "a cup", "steps": 12},
}


@pytest.mark.parametrize("slug", CATALOG)
def test_every_argument_is_a_keyword_of_the_pipeline_s_generate(slug):
    spec = get_model(slug)
    signature = inspect.signature(pipeline_module(slug).generate)
    keywords = {n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(spec.arguments.values()) <= keywords, set(spec.arguments.values()) - keywords
    assert "control" in keywords and "control" not in spec.arguments.values()
    required = {n for n in keywords if signature.parameters[n].default is inspect.Parameter.empty}
    assert required <= set(spec.arguments.values()), f"{slug}: generate needs {required - set(spec.arguments.values())}"


@pytest.mark.parametrize("slug", CATALOG)
def test_every_parameter_reaches_the_pipeline_or_shapes_the_response(slug):
    spec = get_model(slug)
    assert set(spec.param_names) == set(spec.arguments) | (set(spec.param_names) & set(RESPONSE_PARAMS))
    assert not set(spec.arguments) & set(RESPONSE_PARAMS)


def test_no_pipeline_module_translates_parameters_itself():
    for slug in CATALOG:
        assert not hasattr(pipeline_module(slug), "run"), pipeline_module(slug).__name__


def test_sd_requests_map_to_the_txt2img_keywords():
    params = validate("sd1.5-scifi", REQUESTS["sd1.5-scifi"])
    assert get_model("sd1.5-scifi").pipeline_arguments(params) == {
        "prompt": "city", "negative_prompt": None, "width": 768, "height": 512, "num_inference_steps": 20,
        "guidance_scale": 7.5, "num_images": 2, "seed": -1, "scheduler": "UniPC",
    }
    assert get_model("sd1.5-scifi").pipeline == get_model("segmind-vega").pipeline == "txt2img"


def test_renamed_parameters_of_omni_zero_and_ominicontrol():
    omni = get_model("omni-zero").pipeline_arguments(validate("omni-zero", REQUESTS["omni-zero"]))
    assert omni["num_steps"] == 7 and omni["num_images"] == 1 and omni["base_image"] is None
    assert "number_of_steps" not in omni and "base64" not in omni
    mini = get_model("ominicontrol").pipeline_arguments(validate("ominicontrol", REQUESTS["ominicontrol"]))
    assert mini == {"image": "x", "prompt": "a cup", "num_inference_steps": 12, "seed": 12467}


def test_a_left_out_optional_parameter_takes_its_default_a_required_one_is_an_error():
    spec = get_model("sd1.5-img2img")
    params = validate("sd1.5-img2img", REQUESTS["sd1.5-img2img"])
    del params["scheduler"]
    assert spec.pipeline_arguments(params)["scheduler"] == "DDIM"
    del params["image"]
    with pytest.raises(KeyError, match="image"):
        spec.pipeline_arguments(params)


def test_a_spec_must_route_every_parameter():
    params = (Param("prompt", ParamType.STRING, "p"), Param("base64", ParamType.BOOLEAN, "b"))
    ModelSpec(slug="s", title="t", seed_document="d", family=SD, pipeline="txt2img", architecture="sd15", params=params,
              batch_param=None, arguments={"prompt": "prompt"})
    with pytest.raises(ValueError, match="neither the pipeline nor the response"):
        ModelSpec(slug="s", title="t", seed_document="d", family=SD, pipeline="txt2img", architecture="sd15", params=params,
                  batch_param=None)
    with pytest.raises(ValueError, match="unknown parameters"):
        ModelSpec(slug="s", title="t", seed_document="d", family=SD, pipeline="txt2img", architecture="sd15", params=params,
                  batch_param=None, arguments={"prompt": "prompt", "steps": "num_inference_steps"})


@pytest.mark.parametrize("slug", CATALOG)
def test_run_calls_generate_with_the_mapped_arguments_and_the_control(slug, monkeypatch):
    calls = []
    fake = SimpleNamespace(generate=lambda components, **kw: calls.append((components, kw)) or "result")
    monkeypatch.setattr(diffserve.engine.pipelines, "pipeline_module", lambda s: fake)
    params = validate(slug, REQUESTS[slug])
    control = RunControl()
    assert run(slug, params, "components", control) == "result"
    (components, kwargs), = calls
    assert components == "components" and kwargs.pop("control") is control
    assert kwargs == get_model(slug).pipeline_arguments(params)


def test_images_are_uint8_arrays_an_alpha_channel_is_dropped(input_image):
    rgba = np.concatenate([input_image, np.full((*input_image.shape[:2], 1), 7, np.uint8)], axis=-1)
    assert torch.equal(image_to_tensor(rgba, 64, 64), image_to_tensor(input_image, 64, 64))
    pixels = image_to_tensor(input_image, 64, 64)
    assert pixels.shape == (1, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    assert image_to_tensor(input_image, 32, 48).shape == (1, 3, 48, 32)


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                 np.zeros((8, 8, 2), np.uint8)])
def test_an_image_that_is_not_rgb_uint8_is_a_client_error(bad):
    with pytest.raises(InvalidRequest, match="uint8"):
        image_to_tensor(bad, 8, 8)
