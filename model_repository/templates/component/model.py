"""Triton python-backend model for one network component (text encoder, UNet, VAE encoder/decoder).

Runs the component with ONNX Runtime, TensorRT or torch, as the ``runtime`` parameter of its
``config.pbtxt`` says. Dynamic batching hands ``execute`` several requests at once — e.g. UNet
steps of concurrent pipeline requests — which are concatenated along the batch axis when their
other dimensions agree, run as one batch, and split back into one response per request.
Models served unbatched (``max_batch_size: 0``, the face detector) run one request at a time.
Its ``config.pbtxt`` parameters are ``diffserve.triton_serving.stub_params.ComponentModelParams``; the ONNX Runtime
path imports no torch.
"""

import atexit
import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from diffserve.engine.options import EngineOptions
from diffserve.triton_serving.stub_params import ComponentModelParams, exit_without_teardown, instance_device

logger = logging.getLogger("diffserve.component")


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        params = ComponentModelParams.from_model_config(self.config)
        self.name = self.config["name"]
        self.component = params.component
        self.input_names = [i["name"] for i in self.config["input"]]
        self.output_names = [o["name"] for o in self.config["output"]]
        self.batched = int(self.config.get("max_batch_size", 0)) > 0
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = EngineOptions.from_dict(params.options)
        self.device = instance_device(options.device, args)
        if params.runtime == "onnxruntime":
            from diffserve.engine.ort_session import OrtSession

            self._run = OrtSession(version_dir / params.artifact, threads=options.ort_threads, device=self.device,
                                   arena=options.ort_arena).run
        elif params.runtime == "tensorrt":
            from diffserve.engine.runtime_trt import TrtSession

            self._run = TrtSession(version_dir / params.artifact, device=self.device).run
        else:
            self._run = self._torch_runner(params, options)
        logger.info("%s: %s ready (%s, %s, %s)", self.name, self.component, params.runtime, self.device,
                    options.precision_of(self.component))

    def _torch_runner(self, params, options):
        import torch

        from diffserve.engine.runtime_torch import DTYPES, load_component_modules
        from diffserve.engine.torch_optimize import TorchOptimizations, apply_optimizations

        device = torch.device(self.device)
        dtype = DTYPES[options.precision_of(self.component)]
        module = load_component_modules(params.checkpoint, dtype, [self.component])[self.component].to(device)
        opts = TorchOptimizations.parse(options.torch_optimizations)
        module = apply_optimizations({self.component: module}, opts, device)[0][self.component]
        if opts.compile and self.batched:
            module = self._compile_every_batch(module, params, device, dtype)

        @torch.inference_mode()
        def run(feeds):
            args = [torch.from_numpy(feeds[n]).to(device, dtype if feeds[n].dtype == np.float32 and n != "timestep"
                                                  else None) if n in feeds else None for n in self.input_names]
            outs = module(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}

        return run

    def _compile_every_batch(self, module, params, device, dtype):
        """Static-shape graphs: every batch the dynamic batcher can form is padded to a bucket compiled here,
        at load, never inside a request (``diffserve.engine.batch_buckets``)."""
        import torch

        from diffserve.engine.batch_buckets import BucketedModule, batch_buckets
        from diffserve.engine.checkpoint import read_architecture
        from diffserve.engine.descriptors import component_descriptors

        desc = component_descriptors(read_architecture(params.checkpoint))[self.component]
        low, _, high = desc.profile["batch"]
        bucketed = BucketedModule(module, batch_buckets(low, high))

        def zeros(batch):
            out = []
            for spec in desc.inputs:
                shape = (batch, *desc.shape(spec, "min")[1:])
                kind = dtype if spec.dtype == "float32" and spec.name != "timestep" else getattr(torch, spec.dtype)
                out.append(torch.zeros(shape, dtype=kind, device=device))
            return out

        with torch.inference_mode():
            sizes = bucketed.warm_up(zeros)
        logger.info("%s: compiled for batches %s at load", self.name, sizes)
        return bucketed

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            feeds = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feeds[name] = tensor.as_numpy()
            # Unbatched models (max_batch_size 0) run each request alone, outputs whole.
            key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feeds.items())) if self.batched else i
            groups.setdefault(key, []).append((i, feeds))
        for members in groups.values():
            try:
                batch = {n: np.concatenate([f[n] for _, f in members]) for n in members[0][1]}
                if "timestep" in batch and self.batched:  # [B, 1] on the wire (batch axis is implicit), [B] in the graph
                    batch["timestep"] = batch["timestep"].reshape(-1)
                outputs = self._run(batch)
                if not self.batched:
                    [(i, _)] = members
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(n, np.ascontiguousarray(outputs[n].astype(np.float32)))
                        for n in self.output_names])
                    continue
                start = 0
                for i, feeds in members:
                    size = next(iter(feeds.values())).shape[0]
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(n, np.ascontiguousarray(outputs[n][start:start + size].astype(np.float32)))
                        for n in self.output_names
                    ])
                    start += size
            except Exception as exc:  # one bad batch must not take the model down
                logger.exception("%s failed", self.name)
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{self.name}: {type(exc).__name__}: {exc}"))
        return responses

    def finalize(self):
        logger.info("%s unloaded", self.name)
        atexit.register(exit_without_teardown)  # the last registered: runs first
