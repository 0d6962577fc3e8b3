"""``diffserve export`` and ``diffserve triton``: build a model repository, run Triton on it.

The one command line of the export package (``api/cli.py`` attaches these sub-commands); the
work is done by ``export.repository`` and ``export.triton_server``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError
    from export.repository import Deployment, RepositoryOptions, build_demo_repository, build_repository

    options = dict(runtime=args.runtime, modes=tuple(args.modes.split(",")), precision=args.precision,
                   device=args.device, pipeline_instances=args.pipeline_instances,
                   component_instances=args.component_instances, fused_runtime=args.fused_runtime,
                   torch_optimizations=args.torch_optimizations, force=args.force)
    if options["pipeline_instances"] is None:  # the default of RepositoryOptions, or DEMO_OPTIONS with --demo
        del options["pipeline_instances"]
    try:
        if args.demo:
            report = build_demo_repository(Path(args.repository) if args.repository else None, **options)
        elif args.models:
            report = build_repository_from_models(args.models, Path(args.repository or "model_repository"),
                                                  RepositoryOptions(**options))
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
            report = build_repository(Path(args.repository or "model_repository"), deployments,
                                      RepositoryOptions(**options))
    except (ExportError, ValueError, KeyError, FileNotFoundError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"repository": str(report.repository), "pipelines": report.pipelines,
                      "components": report.components, "unavailable": report.unavailable}, indent=2, default=str))
    return 0


def build_repository_from_models(models_file: Path, repository: Path, options):
    """The repository of a ``models.toml``: its complete slugs exported, the others logged and recorded in the
    manifest (``diffserve models check`` says what to do about them)."""
    from engine.model_config import load_models_config
    from export.repository import build_repository, deployments_from_config

    deployments, unavailable = deployments_from_config(load_models_config(models_file))
    for slug, problems in unavailable.items():
        logger.error("%s is left out of the repository: %s", slug, "; ".join(problems))
    if not deployments:
        raise ValueError(f"no slug of {models_file} has complete artifacts; run `diffserve models check --models "
                         f"{models_file}`")
    return build_repository(repository, deployments, options, unavailable=unavailable)


def cmd_triton(args: argparse.Namespace) -> int:
    from engine import home_dir
    from export.repository import build_demo_repository
    from export.triton_server import TritonServerConfig, serve_until_stopped

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("export", help="export checkpoints to ONNX/TensorRT and write a Triton model repository")
    exp.add_argument("--demo", action="store_true", help="tiny demo checkpoints for every slug")
    exp.add_argument("--models", type=Path, metavar="FILE",
                     help="model configuration (models.toml: each slug's published artifacts); slugs whose "
                          "artifacts are incomplete are left out (see `diffserve models check`)")
    exp.add_argument("--model", action="append", metavar="SLUG=DIR[:KEY]",
                     help="serve SLUG from the local diffusers checkpoint DIR (repeatable); slugs sharing a "
                          "KEY share component models")
    exp.add_argument("--repository", help="output repository (default: model_repository/, or the demo one)")
    exp.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "tensorrt", "torch"],
                     help="what the component models run")
    exp.add_argument("--modes", default="bls,fused",
                     help="pipeline modes, comma separated; the first is served under the slug's own name")
    exp.add_argument("--fused-runtime", default="onnxruntime", choices=["onnxruntime", "torch"])
    exp.add_argument("--torch-optimize", dest="torch_optimizations", default="", metavar="SPEC",
                     help="torch optimizations of torch component models and torch fused pipelines: fast, max, "
                          "or e.g. fuse_qkv,channels_last,compile,cuda_graphs (default: none)")
    exp.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    exp.add_argument("--device", default="cpu", help="cpu or cuda (instance kind and torch device)")
    exp.add_argument("--pipeline-instances", type=int, help="instances per pipeline model (default 2; 1 with --demo)")
    exp.add_argument("--component-instances", type=int, default=1)
    exp.add_argument("--force", action="store_true", help="re-export even when artifacts are up to date")
    exp.set_defaults(func=cmd_export)

    from export.triton_server import MODEL_CONTROL_MODES

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
