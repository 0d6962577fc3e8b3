"""The ``diffserve`` command line: generate, demo, serve, worker, models check, export, triton, bench.

This is the one module that composes the command line: argument parsing and the command
functions of generate, demo and serve here, the export and bench parsers added from
``diffserve.export.cli`` and ``diffserve.benchmarks.cli``. Each sub-command imports what it needs only when it runs,
so ``diffserve --help`` is instant and the engine-only commands never load the API or Triton
modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from diffserve.engine import home_dir

logger = logging.getLogger("diffserve")


def cmd_generate(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from diffserve.api.images import ImageFetchPolicy, ImageInputError, load_image_or_file
    from diffserve.engine.catalog import ValidationError, get_model, read_params_argument
    from diffserve.engine.imageio import EXTENSIONS, encode_image
    from diffserve.engine.pipelines import RunControl, run
    from diffserve.engine.runtime_torch import TorchComponents

    spec = get_model(args.slug)
    try:
        params = spec.validate(read_params_argument(args.params))
    except ValidationError as exc:
        print("invalid parameters:\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 2
    except ValueError as exc:  # --params is not a JSON object
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    try:
        checkpoint = _generate_checkpoint(args)
    except ValueError as exc:  # an unusable models.toml or incomplete artifacts
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    try:
        components = TorchComponents(checkpoint, device=args.device, precision=args.precision,
                                     optimizations=args.torch_optimizations)
    except ValueError as exc:  # an unknown optimization or precision, a device this machine lacks
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    policy = ImageFetchPolicy()  # the API's default limits, so a file the API would refuse is refused here too
    try:
        for name in spec.image_params:
            if params.get(name) is not None:
                params[name] = asyncio.run(load_image_or_file(params[name], name, policy))
    except ImageInputError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    bar = tqdm(total=None, desc=args.slug, unit="step")

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = run(args.slug, params, components, RunControl(on_step=on_step))
    bar.close()
    fmt = params.get("image_format") or spec.output_format
    quality = params.get("image_quality", 95)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(result.to_uint8()):
        path = out / f"{args.slug}-{result.seed}-{i}.{EXTENSIONS[fmt]}"
        path.write_bytes(encode_image(pixels, fmt, quality))
        paths.append(str(path))
    print(json.dumps({"slug": args.slug, "seed": result.seed, "steps": result.steps,
                      "timings_s": {k: round(v, 4) for k, v in result.timings.items()}, "images": paths}, indent=2))
    return 0


def _generate_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, else the slug's artifacts from ``--models``/``DIFFSERVE_MODELS`` materialized, else the
    tiny demo checkpoint."""
    from diffserve.engine import models_file as models_toml
    from diffserve.engine.tiny.demo import demo_checkpoints

    if args.checkpoint:
        return Path(args.checkpoint)
    models_file = args.models or (Path(os.environ["DIFFSERVE_MODELS"]) if os.environ.get("DIFFSERVE_MODELS") else None)
    if models_file is not None:
        config = models_toml.load_models_file(models_file)
        if args.slug not in config.entries:
            raise ValueError(f"{models_file} has no [{args.slug}] table")
        return models_toml.materialize(args.slug, config.entries[args.slug])
    return demo_checkpoints()[args.slug]


def cmd_models_check(args: argparse.Namespace) -> int:
    """``diffserve models check``: every configured artifact found or missing, architecture checks, what to do."""
    from diffserve.engine import models_file as models_toml

    models_file = args.models or (Path(os.environ["DIFFSERVE_MODELS"]) if os.environ.get("DIFFSERVE_MODELS") else None)
    if args.demo:
        from diffserve.engine.tiny.demo import demo_models_file

        models_file = demo_models_file()
    if models_file is None:
        print("models check: give --models FILE (or set DIFFSERVE_MODELS), or --demo", file=sys.stderr)
        return 2
    try:
        config = models_toml.load_models_file(models_file)
    except models_toml.ModelsFileError as exc:
        print(f"models check: {exc}", file=sys.stderr)
        return 1
    problems = models_toml.check(config)
    print(models_toml.format_report(config, problems))
    complete = not any(problems.values())
    if args.device or args.gpu_memory_gb:
        from diffserve.export.cli import memory_plan

        checkpoints = models_toml.prepare(config).checkpoints
        plan = memory_plan(checkpoints, args.device or "cuda", args.precision, args.gpu_memory_gb)
        if plan is None:
            print("\nmemory plan: give --gpu-memory-gb (no GPU is visible here)" if (args.device or "cuda") != "cpu"
                  else "\nmemory plan: for GPU deployments (--device cuda)")
        else:
            print("\nmemory plan per GPU (one fused instance per slug):\n" + plan.format())
            complete = complete and plan.fits
    return 0 if complete else 1


def _apply_models_file(args: argparse.Namespace, settings):
    """``serve``'s model check: the complete slugs of ``settings.models_file`` become served checkpoints (local
    backend) or a repository built from them (triton); returns (settings, {slug: [problem, ...]} not served)."""
    if settings.models_file is None:
        if args.backend == "triton" and settings.repository is not None:
            from diffserve.triton_serving.manifest import read_manifest

            try:
                return settings, dict(read_manifest(settings.repository).get("unavailable") or {})
            except FileNotFoundError:
                return settings, {}
        return settings, {}
    from diffserve.engine import models_file as models_toml

    try:
        config = models_toml.load_models_file(settings.models_file)
    except models_toml.ModelsFileError as exc:
        raise SystemExit(f"serve: {exc}") from None
    if args.backend == "local":
        prepared = models_toml.prepare(config)
        unavailable = prepared.unavailable()
        settings = settings.model_copy(update={"checkpoints": {**prepared.checkpoints, **settings.checkpoints}})
    else:
        from diffserve.export.cli import build_repository_from_models, deployment_options

        repository = settings.repository or home_dir() / "repository"
        try:
            options = deployment_options(device=settings.device, precision=settings.precision, gpus=args.gpus,
                                         torch_optimizations=settings.torch_optimizations or "",
                                         ominicontrol_condition=args.ominicontrol_condition,
                                         **settings.repository_batching())
            report = build_repository_from_models(settings.models_file, Path(repository), options,
                                                  args.gpu_memory_gb)
        except ValueError as exc:
            raise SystemExit(f"serve: {exc}") from None
        unavailable = report.unavailable
        settings = settings.model_copy(update={"repository": report.repository})
    for slug, problems in unavailable.items():
        logger.error("not serving %s: %s", slug, "; ".join(problems))
    return settings, unavailable


DEMO_ECHO = (" diffserve.export.repository: ", "ready at", " WARNING ", " ERROR ", " CRITICAL ", "Traceback")
"""What ``diffserve demo`` shows of its server's output: one line per stage and slug, problems, the URL."""
DEMO_READY_TIMEOUT_S = 3600.0  # a first run exports every slug before the server is ready


def cmd_demo(args: argparse.Namespace) -> int:
    """Start ``diffserve serve --demo``, send every slug's seed example through the official SDK,
    save the images, stop the server. The server's whole output goes to ``$DIFFSERVE_HOME/demo-serve.log``."""
    import time

    try:
        from segmind import SegmindClient
    except ImportError:
        raise SystemExit("the demo talks to the server through the official `segmind` SDK: "
                         "pip install segmind (make demo installs it)") from None
    from diffserve.engine.imageio import CONTENT_TYPES, EXTENSIONS
    from diffserve.engine.processes import ChildNotReady, ChildProcess
    from diffserve.engine.tiny.demo import demo_payloads

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the SDK's request lines
    out = home_dir() / "demo-outputs"
    out.mkdir(parents=True, exist_ok=True)
    log_path = home_dir() / "demo-serve.log"
    cmd = [sys.executable, "-m", "diffserve.api.cli", "serve", "--demo", "--backend", args.backend, "--port", "0"]
    print(f"starting: diffserve serve --demo --backend {args.backend}  (first run exports the tiny models; "
          f"its log: {log_path})", flush=True)

    def echo(line: str) -> None:  # the whole output goes to the log, the lines that matter to the terminal
        if any(mark in line for mark in DEMO_ECHO):
            print("  | " + line, flush=True)

    log_path.unlink(missing_ok=True)  # this run's output only
    server = ChildProcess(cmd, name="diffserve serve", log=log_path, on_line=echo).start()
    try:
        try:
            line = server.wait_ready("ready at", DEMO_READY_TIMEOUT_S) or ""
        except ChildNotReady as exc:
            state = (f"was not ready within {DEMO_READY_TIMEOUT_S:g} s" if exc.returncode is None
                     else f"exited with status {exc.returncode} before it was ready")
            print(f"the server {state}; see {log_path}", file=sys.stderr)
            return 1
        url = line.split("ready at", 1)[1].split()[0]
        client = SegmindClient(base_url=f"{url}/v1", timeout=600)  # the demo server is open (no keys)
        kinds = {v: k for k, v in CONTENT_TYPES.items()}
        for slug, payload in demo_payloads().items():
            t0 = time.perf_counter()
            response = client.run_sync(slug, **payload)
            kind = kinds[response.headers["content-type"]]
            path = out / f"{slug}-{payload.get('seed', 'random')}.{EXTENSIONS[kind]}"
            path.write_bytes(response.content)
            print(f"{slug:>14}: {path}  ({time.perf_counter() - t0:.1f} s through /v1, "
                  f"remaining credits {response.headers.get('x-remaining-credits', '-')})", flush=True)
        print(f"demo images written to {out}")
        return 0
    finally:
        server.stop(120)  # SIGTERM: the server stops the API, then its Triton; SIGKILL after 120 s


def _parse_checkpoint(text: str) -> tuple[str, Path]:
    slug, sep, path = text.partition("=")
    if not sep or not slug or not path:
        raise argparse.ArgumentTypeError(f"expected SLUG=DIR, got {text!r}")
    return slug, Path(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError as SettingsError

    from diffserve.api.app import create_app
    from diffserve.api.server import run_until_stopped
    from diffserve.api.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "device", "precision", "repository", "triton_url",
                 "torch_optimizations", "models_file", "redis_url"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.api_key:
        overrides["api_keys"] = args.api_key
    if args.demo and args.data_dir is None and "DIFFSERVE_DATA_DIR" not in os.environ:
        overrides["data_dir"] = home_dir() / "api"
    try:
        settings = Settings(**overrides)
        if args.checkpoint:
            settings = Settings(**overrides, checkpoints={**settings.checkpoints, **dict(args.checkpoint)})
    except SettingsError as exc:
        # Without the input values: they may hold API keys.
        problems = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                    for e in exc.errors(include_input=False, include_url=False)]
        raise SystemExit("invalid settings:\n" + "\n".join(problems)) from None
    unavailable: dict[str, str] = {}
    if args.role == "api":
        if settings.redis_url is None:
            raise SystemExit("serve --role api needs the shared store: --redis-url redis://HOST:PORT/0 "
                             "(or DIFFSERVE_REDIS_URL)")
        from diffserve.api.app import QueueOnlyBackend

        backend = QueueOnlyBackend()
    else:
        settings, unavailable = _apply_models_file(args, settings)
        if args.backend == "local":
            from diffserve.api.backend_local import create_local_backend

            backend = create_local_backend(settings, demo=args.demo)
        else:
            from diffserve.api.backend_triton import create_triton_backend

            backend = create_triton_backend(settings, demo=args.demo)
    backend.unavailable = unavailable  # read by /readyz: why a configured slug is not served
    app = create_app(settings, backend, role=args.role)
    return run_until_stopped(app, settings, access_log=args.verbose, ready_line=lambda url: (
        f"diffserve API ready at {url}  (SDK base_url {url}/v1, docs {url}/docs)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one request in-process and write the images")
    gen.add_argument("--slug", required=True, help="model slug, e.g. sd1.5-scifi")
    gen.add_argument("--params", default="{}", help="request JSON (or @file.json), as sent to the API")
    gen.add_argument("--out", default="outputs", help="directory for the images")
    gen.add_argument("--checkpoint", help="local diffusers checkpoint directory (default: tiny demo checkpoint)")
    gen.add_argument("--models", type=Path, metavar="FILE",
                     help="models file (models.toml; default DIFFSERVE_MODELS): the slug's published artifacts")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    gen.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--optimize", dest="torch_optimizations", metavar="SPEC",
                     help="torch optimizations: fast, max, or e.g. fuse_qkv,channels_last,compile,device_scheduler "
                          "(engine/torch_optimize.py lists them)")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="start `serve --demo`, send every slug's seed example through the "
                                       "official SDK, save the images, stop")
    demo.add_argument("--backend", choices=["triton", "local"], default="triton",
                      help="serve backend (default triton: the tiny models exported to a Triton repository)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run the HTTP API (Segmind contract: /v1, /v2); settings from DIFFSERVE_*")
    serve.add_argument("--demo", action="store_true",
                       help="serve the tiny demo models (local: demo checkpoints; triton: the demo repository)")
    serve.add_argument("--backend", choices=["triton", "local"], default="triton",
                       help="triton: pipeline models on a Triton server (default; started on --repository "
                            "unless --triton-url names a running one); local: pipelines in this process")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", action="append", metavar="KEY",
                       help="accepted API key (repeatable; default DIFFSERVE_API_KEYS; none: open server)")
    serve.add_argument("--data-dir", type=Path, help="job database and outputs (default var/api)")
    serve.add_argument("--checkpoint", action="append", type=_parse_checkpoint, metavar="SLUG=DIR",
                       help="local diffusers checkpoint for a slug (repeatable; local backend)")
    serve.add_argument("--models", dest="models_file", type=Path, metavar="FILE",
                       help="models file (models.toml; default DIFFSERVE_MODELS): checked at start, complete "
                            "slugs served (triton: exported into --repository, default var/repository)")
    serve.add_argument("--repository", type=Path, help="Triton model repository (triton backend)")
    serve.add_argument("--triton-url", help="gRPC host:port of a running Triton server (default: start one)")
    serve.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU); with --models and "
                                        "triton, the device of the repository built")
    serve.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                       help="denoisers and text encoders (default: fp16, bf16 for FLUX, on GPU; fp32 on CPU)")
    serve.add_argument("--gpus", metavar="0,1", help="with --models and triton: GPUs to spread the slugs' instances "
                                                     "over (default: all visible)")
    serve.add_argument("--gpu-memory-gb", type=float, help="GPU memory for the memory plan (default: detected)")
    serve.add_argument("--ominicontrol-condition", choices=["joint", "cached"], default="joint",
                       help="OminiControl condition attention (with --models and triton)")
    serve.add_argument("--optimize", dest="torch_optimizations", metavar="SPEC",
                       help="local backend torch optimizations (see `generate --optimize`)")
    serve.add_argument("--role", choices=["all", "api"], default="all",
                       help="all: API and jobs in this process (default); api: a stateless replica that queues "
                            "jobs in Redis for `diffserve worker`s and runs none (needs --redis-url)")
    serve.add_argument("--redis-url", help="shared store for scale-out, e.g. redis://redis:6379/0 "
                                           "(DIFFSERVE_REDIS_URL; default: SQLite under --data-dir)")
    serve.set_defaults(func=cmd_serve)
    from diffserve.api.worker import add_parser as add_worker_parser

    add_worker_parser(sub)

    models = sub.add_parser("models", help="the models file (models.toml)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    check = models_sub.add_parser("check", help="per slug: every artifact found or missing, architecture checks, "
                                                "what to do; exit 0 when every configured slug is complete")
    check.add_argument("--models", type=Path, metavar="FILE", help="models.toml (default DIFFSERVE_MODELS)")
    check.add_argument("--demo", action="store_true", help="the tiny demo's models.toml")
    check.add_argument("--device", help="print the memory plan for this device (cuda)")
    check.add_argument("--gpu-memory-gb", type=float, help="GPU memory for the memory plan (default: detected)")
    check.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="as serve --precision")
    check.set_defaults(func=cmd_models_check)
    from diffserve.benchmarks.cli import add_parsers as add_bench_parsers
    from diffserve.export.cli import add_parsers as add_export_parsers

    add_export_parsers(sub)
    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
