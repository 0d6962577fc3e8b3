"""diffserve's engine: the math of serving the five models, with no HTTP and no Triton in it.

Its rooms: ``catalog`` (every slug's parameters, defaults and ranges, and how they map onto a
pipeline's arguments), ``checkpoint`` (a diffusers checkpoint directory's layout read into a
``CheckpointArchitecture``; ``omni_zero_checkpoint`` for Omni-Zero's additions), ``components`` (the
``Components`` protocol pipelines call networks through, and the named-tensor adapter every runtime
builds on), ``descriptors`` (each network's tensor names and shape profiles), ``pipelines/`` (one
denoising loop per module; ``pipelines.run`` serves a slug), ``batching`` (step-level batching of
concurrent requests' denoising loops), ``schedulers`` (API scheduler names -> fresh diffusers
schedulers) and ``planned_loop`` (those schedulers as precomputed weights, run on the device),
the runtimes ``runtime_torch`` (with ``torch_optimize``), ``runtime_onnx`` (over the torch-free
``ort_session``) and ``runtime_trt``, the Omni-Zero and OminiControl networks
(``omni_zero_modules``, ``face_analysis``, ``flux_condition``), ``imageio`` (encoding outputs) and
``tiny/`` (random-weight checkpoints and demo data for tests and the demo). It imports nothing of
``export``, ``benchmarks``, ``api`` or ``model_repository``, nor any Triton module.
"""

import os
from pathlib import Path


def home_dir() -> Path:
    """Where demo checkpoints, repositories, outputs and compile caches live (``DIFFSERVE_HOME``, default ./var)."""
    return Path(os.environ.get("DIFFSERVE_HOME", "var")).resolve()
