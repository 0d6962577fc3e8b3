"""Triton python-backend pipeline model: one slug's denoising loop, served by Triton.

Runs ``diffserve.engine.pipelines.run`` — the same code as the in-process engine — with a
``Components`` object chosen by the ``mode`` parameter of ``config.pbtxt``:

* ``bls``: every network call is a BLS request to a component model (separate instance counts;
  the UNet model's dynamic batcher merges steps of concurrent requests);
* ``fused``: the networks run in this process (ONNX Runtime or torch); no per-step IPC.

The model is decoupled and takes many requests in flight: ``execute`` parses each request and hands
it to a pool of worker threads, then returns at once (a model that runs one request at a time runs it
in ``execute``, and Triton's queue holds the others); a worker runs it through the instance's
``diffserve.engine.batching.PipelineRunner`` and sends its responses through the request's response sender — a
``PROGRESS`` response after every UNet step, then one final response with ``IMAGES`` (uint8 NHWC),
``SEED`` and ``INFO`` (JSON: timings, and ``batch``, the most requests and UNet rows of one batched
call it took part in), and ``IMAGES_FLOAT`` when the client asks for it. Between steps it polls for
client cancellation; an error answers its own request only.

A fused instance with batching on (``EngineOptions.batching``, from ``config.pbtxt``) step-batches
every slug: ``max_batch`` worker threads, each with its own stages before and after the loop (text
encoding, VAE, Omni-Zero's image preprocessing), share one ``StepBatcher`` per denoiser (the UNet,
Omni-Zero's ``controlnet_unet``, OminiControl's transformer) — one copy of the weights per instance
whatever the load. A bls pipeline (its UNet model's dynamic batcher merges steps instead) and batching off
run one request at a time.

Wire format: ``diffserve.engine.request.GenerationRequest`` — ``REQUEST`` is JSON ``{"slug", "params"}``
with the parameters the API validated; image parameters travel as separate UINT8 [H, W, 3] inputs
named after the parameter. The model trusts the values and refuses (INVALID_ARG) only what cannot
be a validated request. Its ``config.pbtxt`` parameters are ``diffserve.triton_serving.stub_params.PipelineModelParams``.
"""

import atexit
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from diffserve.engine.batching import PipelineRunner
from diffserve.engine.catalog import InvalidRequest, get_model
from diffserve.engine.components import NamedTensorComponents
from diffserve.engine.descriptors import component_descriptors
from diffserve.engine.pipelines import Cancelled, RunControl
from diffserve.engine.request import REQUEST_TENSOR, GenerationRequest
from diffserve.engine.options import EngineOptions
from diffserve.triton_serving.stub_params import PipelineModelParams, exit_without_teardown, instance_device

logger = logging.getLogger("diffserve.pipeline")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ComponentError(RuntimeError):
    pass


class BlsComponents(NamedTensorComponents):
    """``Components`` whose calls are BLS requests to the component models."""

    def __init__(self, checkpoint, model_names):
        super().__init__(checkpoint, "cpu")
        self.model_names = model_names
        self.outputs = {name: list(d.output_names) for name, d in component_descriptors(self.config).items()}

    def run_component(self, component, inputs):
        tensors = []
        for name, value in inputs.items():
            if value is None:
                continue
            array = value.detach().cpu().contiguous().numpy()
            if name == "timestep":
                array = array.reshape(-1, 1)  # the batch axis is implicit in the component's config
            tensors.append(pb_utils.Tensor(name, array))
        request = pb_utils.InferenceRequest(model_name=self.model_names[component], inputs=tensors,
                                            requested_output_names=self.outputs[component])
        response = request.exec()
        if response.has_error():
            raise ComponentError(f"{self.model_names[component]}: {response.error().message()}")
        return {name: torch.from_numpy(pb_utils.get_output_tensor_by_name(response, name).as_numpy().copy())
                for name in self.outputs[component]}


def fused_components(params, options, device):
    if params.fused_runtime == "torch":
        from diffserve.engine.runtime_torch import TorchComponents

        # options.precision is the denoisers' and text encoders'; TorchComponents keeps a force_upcast VAE
        # in fp32, as options.precisions records. Compiled components are warmed up here, at load.
        components = TorchComponents(params.checkpoint, device=device, precision=options.precision,
                                     optimizations=options.torch_optimizations or None)
    else:
        from diffserve.engine.runtime_onnx import OnnxComponents

        components = OnnxComponents(params.checkpoint, params.artifacts, options=options)
    components.condition_mode = options.ominicontrol_condition
    return components


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        params = PipelineModelParams.from_model_config(self.config)
        self.name = self.config["name"]
        self.slug = params.slug
        self.mode = params.mode
        self.image_params = get_model(self.slug).image_params
        options = EngineOptions.from_dict(params.options)
        if self.mode == "bls":
            self.components = BlsComponents(params.checkpoint, params.components)
            self.components.condition_mode = options.ominicontrol_condition
            batching = None
        else:
            self.components = fused_components(params, options, instance_device(options.device, args))
            batching = options.batching_options()
        self.runner = PipelineRunner(self.components, batching, name=f"batcher-{self.name}")
        self.batching = ({"max_batch": batching.max_batch, "buckets": list(batching.buckets)}
                         if self.runner.batches(self.slug) else None)
        self.closing = False
        capacity = self.runner.capacity(self.slug)
        # One request at a time: execute runs it and Triton's own queue holds the others, as before batching.
        self.pool = (ThreadPoolExecutor(max_workers=capacity, thread_name_prefix=self.name) if capacity > 1
                     else None)
        for index in range(self.components.config.num_text_encoders):
            self.components.tokenizer(index)  # load now, not on the first request
        report = getattr(self.components, "optimization_report", None)  # fused torch components
        self.optimizations = None if report is None else {
            "spec": self.components.optimizations.spec(), "applied": report.applied, "fallbacks": report.fallbacks,
            "warmup_s": report.warmup_seconds}
        self.condition_mode = options.ominicontrol_condition
        logger.info("%s: %s pipeline ready (%s mode, %s, %s)", self.name, self.slug, self.mode,
                    getattr(self.components, "device", options.device),
                    f"step-batched up to {batching.max_batch} rows" if self.batching else "one request at a time")

    def execute(self, requests):
        """Parse each request and queue it for a worker thread (or, one at a time, run it); each request's
        responses go through its own response sender."""
        for request in requests:
            sender = request.get_response_sender()
            request_id = request.request_id()
            try:
                params = self._request(request).pipeline_params()
                wanted = set(request.requested_output_names() or [])
            except InvalidRequest as exc:
                self._send_error(sender, f"invalid request: {exc}", pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as exc:  # answer with an error; never take the model down
                logger.exception("%s: request %s could not be read", self.name, request_id)
                self._send_error(sender, f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
                continue
            if self.pool is None:
                self._handle(sender, request_id, params, wanted, time.perf_counter())
            else:
                self.pool.submit(self._handle, sender, request_id, params, wanted, time.perf_counter())
        return None

    def _handle(self, sender, request_id, params, wanted, queued_at):
        t0 = time.perf_counter()
        try:
            if self.closing:
                raise Cancelled("the model is unloading")

            def on_step(done, total):
                if "PROGRESS" in wanted:
                    progress = pb_utils.Tensor("PROGRESS", np.array([done, total], dtype=np.int32))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[progress]))

            control = RunControl(on_step=on_step, is_cancelled=lambda: self.closing or sender.is_cancelled())
            result = self.runner.run(self.slug, params, control)
            info = {"steps": result.steps, "timings": result.timings, "mode": self.mode,
                    "condition_mode": self.condition_mode, "batching": self.batching, "batch": result.batch,
                    "model_seconds": time.perf_counter() - t0, "pool_wait_seconds": t0 - queued_at}
            if self.optimizations is not None:
                info["torch_optimizations"] = self.optimizations
            outputs = [
                pb_utils.Tensor("IMAGES", result.to_uint8()),
                pb_utils.Tensor("SEED", np.array([result.seed], dtype=np.int64)),
                pb_utils.Tensor("INFO", np.array([json.dumps(info).encode()], dtype=np.object_)),
            ]
            if "IMAGES_FLOAT" in wanted:
                outputs.append(pb_utils.Tensor("IMAGES_FLOAT", result.images.astype(np.float32)))
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
        except InvalidRequest as exc:  # one the pipeline refuses (a faceless portrait)
            self._send_error(sender, f"invalid request: {exc}", pb_utils.TritonError.INVALID_ARG)
        except Exception as exc:  # answer with an error; never take the model down
            if self.closing:
                logger.info("%s: request %s stopped: the model is unloading", self.name, request_id)
                self._send_error(sender, "the model is unloading", pb_utils.TritonError.UNAVAILABLE)
            elif isinstance(exc, Cancelled):
                logger.info("%s: request %s cancelled by the client", self.name, request_id)
                self._send_error(sender, "cancelled", pb_utils.TritonError.CANCELLED)
            elif isinstance(exc, ComponentError):
                logger.error("%s: request %s: component failed: %s", self.name, request_id, exc)
                self._send_error(sender, f"component failed: {exc}", pb_utils.TritonError.UNAVAILABLE)
            else:
                logger.exception("%s: request %s failed", self.name, request_id)
                self._send_error(sender, f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)

    def _request(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, REQUEST_TENSOR)
        images = {}
        for name in self.image_params:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                images[name] = tensor.as_numpy().copy()  # a worker thread reads it after execute returns
        return GenerationRequest.decode(self.slug, None if raw is None else raw.as_numpy().reshape(-1)[0], images)

    @staticmethod
    def _send_error(sender, message, code):
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
        except Exception:  # the client may be gone (cancelled); nothing is left to answer
            logger.debug("could not send error response: %s", message)

    def finalize(self):
        # Requests in flight stop at their next step (is_cancelled sees closing) and are answered UNAVAILABLE;
        # queued ones are answered at once; then the workers and the batcher thread end.
        self.closing = True
        self.runner.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        logger.info("%s unloaded", self.name)
        atexit.register(exit_without_teardown)  # the last registered: runs first
