"""The model repository's configs: Triton's own schema parses them, and each stub's typed
parameters read back exactly what export wrote; the request wire form between client and stub."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from diffserve.engine.catalog import get_model, validate
from diffserve.engine.request import GenerationRequest, MalformedRequest
from diffserve.engine.options import EngineOptions
from diffserve.export.repository import Deployment, RepositoryOptions, build_repository
from diffserve.triton_serving.manifest import read_manifest
from diffserve.triton_serving.stub_params import ComponentModelParams, PipelineModelParams


def _model_config(path):
    """``config.pbtxt`` as the JSON Triton hands a python model's ``initialize``."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def torch_repository(tmp_path_factory, sd15_dir):
    """Torch components and bls pipelines only: nothing to export, so the build takes a second."""
    repo = tmp_path_factory.mktemp("repo")
    deployments = [Deployment("sd1.5-scifi", sd15_dir, key="sd15"), Deployment("sd1.5-img2img", sd15_dir, key="sd15")]
    build_repository(repo, deployments, RepositoryOptions(runtime="torch", modes=("bls",), pipeline_instances=1,
                                                          torch_optimizations="channels_last"))
    return repo


def test_stub_parameters_read_back_what_export_wrote(torch_repository, sd15_dir):
    manifest = read_manifest(torch_repository)
    for name, info in manifest["components"].items():
        params = ComponentModelParams.from_model_config(_model_config(torch_repository / name / "config.pbtxt"))
        options = EngineOptions.from_dict(params.options)
        assert params == ComponentModelParams(component=info["component"], runtime="torch",
                                              checkpoint=str(sd15_dir.resolve()), options=options.to_dict())
        assert (options.device, options.precision_of(info["component"]), options.torch_optimizations) == \
            ("cpu", "fp32", "channels_last")
        assert manifest["engine_options"]["sd1.5-scifi"] == options.to_dict()
    for name, info in manifest["pipelines"].items():
        params = PipelineModelParams.from_model_config(_model_config(torch_repository / name / "config.pbtxt"))
        assert (params.slug, params.mode, params.artifacts) == (info["slug"], "bls", {})
        assert sorted(params.components.values()) == info["depends_on"]


def test_stub_parameters_refuse_a_config_of_the_other_kind(torch_repository):
    config = _model_config(torch_repository / "sd1.5-scifi" / "config.pbtxt")
    with pytest.raises(ValueError, match=r"do not match ComponentModelParams.*unknown: \['artifacts'"):
        ComponentModelParams.from_model_config(config)
    with pytest.raises(ValueError, match="unknown mode 'eager'"):
        PipelineModelParams(slug="sd1.5-scifi", mode="eager", checkpoint="/c")
    with pytest.raises(ValueError, match="needs an artifact"):
        ComponentModelParams(component="unet", runtime="onnxruntime", checkpoint="/c")


def test_stub_module_imports_no_torch():
    """The ONNX Runtime component stub imports it; torch would cost each process ~200 MB."""
    code = "import sys, diffserve.triton_serving.stub_params; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _img2img_params():
    params = validate("sd1.5-img2img", {"image": "<decoded>", "prompt": "a fantasy landscape", "seed": 7})
    return params | {"image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)}


def test_request_wire_form_round_trips():
    params = _img2img_params()
    payload, tensors = GenerationRequest.from_params("sd1.5-img2img", params).encode()
    assert json.loads(payload) == {"slug": "sd1.5-img2img", "params": {k: v for k, v in params.items() if k != "image"}}
    decoded = GenerationRequest.decode("sd1.5-img2img", payload, tensors).pipeline_params()
    assert decoded.keys() == params.keys() and np.array_equal(decoded["image"], params["image"])
    absent = GenerationRequest.from_params("sd1.5-img2img", params | {"image": None})
    assert absent.images == {} and absent.pipeline_params()["image"] is None


@pytest.mark.parametrize("image, message", [
    (np.zeros((0, 4, 3), np.uint8), r"H, W > 0, got uint8 \[0, 4, 3\]"),
    (np.zeros((4, 4, 3), np.float32), "got float32"),
    (np.zeros((4, 4, 4), np.uint8), r"\[4, 4, 4\]"),
    (np.zeros((4, 4), np.uint8), r"\[4, 4\]"),
    ("a PIL image", "got str"),
])
def test_request_refuses_images_that_are_not_uint8_hw3(image, message):
    with pytest.raises(MalformedRequest, match=message):
        GenerationRequest.from_params("sd1.5-img2img", _img2img_params() | {"image": image})


def test_decode_refuses_what_cannot_be_a_validated_request():
    payload, _ = GenerationRequest.from_params("sd1.5-img2img", _img2img_params()).encode()
    body = json.loads(payload)
    cases = {
        None: "missing REQUEST",
        b"\xff not json": "not JSON",
        b"[1, 2]": "must be a JSON object",
        json.dumps(body | {"slug": "sd1.5-scifi"}).encode(): "this model serves 'sd1.5-img2img'",
        json.dumps(body | {"params": body["params"] | {"bogus": 1}}).encode(): "unknown parameter.*'bogus'",
        json.dumps(body | {"params": {"prompt": "x"}}).encode(): "missing parameter.*'seed'",
    }
    for raw, message in cases.items():
        with pytest.raises(MalformedRequest, match=message):
            GenerationRequest.decode("sd1.5-img2img", raw, {})
    # Values are the API's to validate: the stub takes an out-of-range one as it comes.
    wide = body | {"params": body["params"] | {"samples": 9}}
    assert GenerationRequest.decode("sd1.5-img2img", json.dumps(wide).encode(), {}).params["samples"] == 9
    assert get_model("sd1.5-img2img").param("samples").maximum < 9
