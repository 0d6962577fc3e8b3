"""``diffserve export`` and ``diffserve triton``: build a model repository, run Triton on it.

The one command line of the export package (``api/cli.py`` attaches these sub-commands); the
work is done by ``diffserve.export.repository`` and ``diffserve.triton_serving.server``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

logger = logging.getLogger(__name__)


def deployment_options(*, device: str | None = None, precision: str | None = None, gpus: str | None = None,
                       runtime: str | None = None, fused_runtime: str | None = None, modes: str | None = None,
                       pipeline_instances: int | None = None, demo: bool = False, **rest):
    """``RepositoryOptions`` from the command line, with the defaults of a deployment.

    A deployment of published weights (``--models``, ``--model``) defaults to the host's GPUs when torch sees
    any (``--device cuda`` builds one anywhere: writing configs needs no GPU), and to one fused pipeline
    instance per slug and device: one copy of each slug's weights per GPU (bls would add a component model
    per network, another copy, and every step's tensors through host memory). On CUDA the networks run in
    torch (the GPU path that has been measured); on a CPU in ONNX Runtime. The tiny demo keeps both modes.
    """
    import torch

    from diffserve.export.repository import DEMO_OPTIONS, RepositoryOptions

    if device is None:
        device = "cpu" if demo or not torch.cuda.is_available() else "cuda"
    cuda = device.startswith("cuda")
    if gpus:
        gpu_ids = tuple(int(g) for g in gpus.split(","))
    else:
        gpu_ids = tuple(range(torch.cuda.device_count())) if cuda and torch.cuda.is_available() else ()
    default_runtime = "torch" if cuda else "onnxruntime"
    default_modes = DEMO_OPTIONS["modes"] if demo else ("fused",)
    options = dict(rest, device=device, precision=precision or "", gpus=gpu_ids,
                   runtime=runtime or default_runtime, fused_runtime=fused_runtime or default_runtime,
                   modes=tuple(modes.split(",")) if modes else default_modes,
                   pipeline_instances=pipeline_instances or (DEMO_OPTIONS["pipeline_instances"] if demo else 1))
    return RepositoryOptions(**options)


def cmd_export(args: argparse.Namespace) -> int:
    from diffserve.export.onnx_export import ExportError
    from diffserve.export.repository import Deployment, build_demo_repository, build_repository

    try:
        options = deployment_options(
            device=args.device, precision=args.precision, gpus=args.gpus, runtime=args.runtime,
            fused_runtime=args.fused_runtime, modes=args.modes, pipeline_instances=args.pipeline_instances,
            demo=args.demo, component_instances=args.component_instances,
            torch_optimizations=args.torch_optimizations, force=args.force,
            ominicontrol_condition=args.ominicontrol_condition, ort_arena=args.ort_arena, ort_threads=args.ort_threads,
            batching=not args.no_batching, max_batch=args.max_batch,
            batch_buckets=tuple(int(b) for b in args.batch_buckets.split(",")) if args.batch_buckets else ())
        if args.demo:
            report = build_demo_repository(Path(args.repository) if args.repository else None,
                                           **{k: v for k, v in asdict(options).items()})
        elif args.models:
            report = build_repository_from_models(args.models, Path(args.repository or "model_repository"), options,
                                                  args.gpu_memory_gb)
        else:
            if not args.model:
                print("give --demo, --models FILE or at least one --model SLUG=CHECKPOINT_DIR[:KEY]", file=sys.stderr)
                return 2
            deployments = []
            for item in args.model:
                slug, _, rest = item.partition("=")
                path, _, key = rest.partition(":")
                if not path:
                    print(f"--model {item!r}: expected SLUG=CHECKPOINT_DIR[:KEY]", file=sys.stderr)
                    return 2
                deployments.append(Deployment(slug=slug, checkpoint=Path(path), key=key))
            report = build_repository(Path(args.repository or "model_repository"), deployments, options)
    except (ExportError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"repository": str(report.repository), "pipelines": report.pipelines,
                      "components": report.components, "unavailable": report.unavailable}, indent=2, default=str))
    return 0


def build_repository_from_models(models_file: Path, repository: Path, options, gpu_memory_gb: float | None = None):
    """The repository of a ``models.toml``: its complete slugs exported, the others logged and recorded in the
    manifest (``diffserve models check`` says what to do about them). A CUDA deployment whose memory plan
    (``diffserve.engine.memory_plan``) does not fit the GPU is refused before anything is exported or loaded."""
    from diffserve.engine.models_file import load_models_file
    from diffserve.export.repository import build_repository, deployments_from_config

    deployments, unavailable = deployments_from_config(load_models_file(models_file))
    for slug, problems in unavailable.items():
        logger.error("%s is left out of the repository: %s", slug, "; ".join(problems))
    if not deployments:
        raise ValueError(f"no slug of {models_file} has complete artifacts; run `diffserve models check --models "
                         f"{models_file}`")
    plan = memory_plan({d.slug: d.checkpoint for d in deployments}, options.device, options.precision or None,
                       gpu_memory_gb, options.gpus)
    if plan is not None:
        logger.info("memory plan per GPU:\n%s", plan.format())
        if not plan.fits:
            raise ValueError(f"this deployment does not fit the GPU:\n{plan.format()}")
    return build_repository(repository, deployments, options, unavailable=unavailable)


def memory_plan(checkpoints: dict[str, Path], device: str, precision: str | None = None,
                gpu_memory_gb: float | None = None, gpus: tuple[int, ...] = ()):
    """The per-GPU plan of one fused instance per slug, against ``gpu_memory_gb`` or the smallest GPU named
    (None on a CPU deployment, or when no size is given and no GPU is visible)."""
    from diffserve.engine.memory_plan import plan_deployment

    if not device.startswith("cuda"):
        return None
    if gpu_memory_gb is None:
        import torch

        if not torch.cuda.is_available():
            return None
        gpu_memory_gb = min(torch.cuda.get_device_properties(g).total_memory for g in (gpus or (0,))) / 1e9
    return plan_deployment(checkpoints, gpu_memory_gb, device, precision)


def cmd_triton(args: argparse.Namespace) -> int:
    from diffserve.engine import home_dir
    from diffserve.export.repository import build_demo_repository
    from diffserve.triton_serving.server import TritonServerConfig, serve_until_stopped

    repo = args.repository
    if args.demo:
        repo = build_demo_repository(repo).repository
    if not repo:
        print("give --repository DIR or --demo", file=sys.stderr)
        return 2
    try:
        config = TritonServerConfig(
            repository=repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            host=args.host, log_verbose=args.log_verbose, model_control_mode=args.model_control_mode,
            load_models=args.load_models, extra_pythonpath=args.pythonpath,
            log_file=args.log_file or home_dir() / "triton.log", startup_timeout_s=args.startup_timeout,
            exit_timeout_s=args.exit_timeout, extra_args=args.extra_args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    return serve_until_stopped(config)


def add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape a deployment's ``EngineOptions`` (``export`` and ``serve --models``)."""
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                        help="denoisers and text encoders (default: fp16 for SD and bf16 for FLUX on CUDA, fp32 on "
                             "CPU); a VAE whose config forces upcast stays fp32")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU; --demo: cpu); "
                                         "building for cuda needs no GPU")
    parser.add_argument("--gpus", metavar="0,1", help="GPUs to spread the pipeline instances over (default: all visible)")
    parser.add_argument("--ominicontrol-condition", choices=["joint", "cached"], default="joint",
                        help="OminiControl condition attention: joint (the reference as shipped) or cached")
    parser.add_argument("--gpu-memory-gb", type=float,
                        help="memory of each GPU for the memory plan (default: the smallest GPU named)")
    parser.add_argument("--ort-arena", action="store_true", help="ONNX Runtime's CPU memory arena (off: see README)")
    parser.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT's choice)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export checkpoints to ONNX/TensorRT and write a Triton model repository")
    exp.add_argument("--demo", action="store_true", help="tiny demo checkpoints for every slug")
    exp.add_argument("--models", type=Path, metavar="FILE",
                     help="models file (models.toml: each slug's published artifacts); slugs whose "
                          "artifacts are incomplete are left out (see `diffserve models check`)")
    exp.add_argument("--model", action="append", metavar="SLUG=DIR[:KEY]",
                     help="serve SLUG from the local diffusers checkpoint DIR (repeatable); slugs sharing a "
                          "KEY share component models")
    exp.add_argument("--repository", help="output repository (default: model_repository/, or the demo one)")
    exp.add_argument("--runtime", choices=["onnxruntime", "tensorrt", "torch"],
                     help="what the component models run (default: torch on CUDA, onnxruntime on CPU)")
    exp.add_argument("--modes", help="pipeline modes, comma separated; the first is served under the slug's own "
                                     "name (default: fused, one copy of each slug's weights per device; "
                                     "fused,bls with --demo)")
    exp.add_argument("--fused-runtime", choices=["onnxruntime", "torch"],
                     help="what fused pipelines run (default: torch on CUDA, onnxruntime on CPU)")
    exp.add_argument("--torch-optimize", dest="torch_optimizations", default="", metavar="SPEC",
                     help="torch optimizations of torch component models and torch fused pipelines: fast, max, "
                          "or e.g. fuse_qkv,channels_last,compile,cuda_graphs (default: none)")
    add_deployment_arguments(exp)
    exp.add_argument("--pipeline-instances", type=int,
                     help="instances per fused pipeline model and device (default 1; each is a copy of the weights)")
    exp.add_argument("--component-instances", type=int, default=1)
    exp.add_argument("--no-batching", action="store_true",
                     help="fused pipeline instances run one request at a time (default: step-level batching of the "
                          "SD slugs' requests in flight)")
    exp.add_argument("--max-batch", type=int, default=8,
                     help="most UNet rows in one batched call, and requests in flight per instance (default 8)")
    exp.add_argument("--batch-buckets", metavar="1,2,4,8",
                     help="batch sizes a call is padded up to (those compiled or captured; default: none)")
    exp.add_argument("--force", action="store_true", help="re-export even when artifacts are up to date")
    exp.set_defaults(func=cmd_export)

    from diffserve.triton_serving.server import MODEL_CONTROL_MODES

    tri = sub.add_parser("triton", help="run tritonserver (from the nvidia-pytriton wheel) on a model repository "
                                        "until Ctrl-C/SIGTERM")
    tri.add_argument("--repository", type=Path, help="model repository directory")
    tri.add_argument("--demo", action="store_true", help="build (if needed) and serve the demo repository")
    tri.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    tri.add_argument("--http-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--metrics-port", type=int, default=None, help="default: a free port")
    tri.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    tri.add_argument("--log-file", type=Path, default=None,
                     help="Triton's whole log (default: triton.log under DIFFSERVE_HOME, var/); warnings and "
                          "errors are echoed")
    tri.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="none")
    tri.add_argument("--load-model", action="append", default=[], dest="load_models",
                     help="with --model-control-mode explicit; repeatable, '*' for all")
    tri.add_argument("--pythonpath", action="append", type=Path, default=[],
                     help="extra import path for model.py files; repeatable")
    tri.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    tri.add_argument("--exit-timeout", type=float, default=30.0,
                     help="seconds a stopping server waits for in-flight requests and model unloads")
    tri.add_argument("extra_args", nargs="*", metavar="TRITON_ARG", help="after --: passed to tritonserver")
    tri.set_defaults(func=cmd_triton)
