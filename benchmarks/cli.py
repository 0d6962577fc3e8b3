"""``diffserve bench engine|serve|batching|capacity|checkpoint|report|store``: the benchmark commands.

Wired into the ``diffserve`` CLI by ``add_parsers(sub)``; ``python -m diffserve.benchmarks.cli ...`` runs
the same commands without it. Each command writes its JSON, markdown and plots under
``benchmarks/results/`` (``--out`` elsewhere) and prints the markdown.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _slug_dir(text: str) -> tuple[str, Path]:
    slug, sep, path = text.partition("=")
    if not sep or not slug or not path:
        raise argparse.ArgumentTypeError(f"expected SLUG=DIR, got {text!r}")
    return slug, Path(path)


def _work_dir() -> Path:
    from diffserve.engine import home_dir

    return home_dir() / "bench"


def _finish(report: dict[str, Any], args: argparse.Namespace) -> int:
    from diffserve.benchmarks.report import render_markdown, write_report

    paths = write_report(report, Path(args.out) if args.out else None, args.name, plots=not args.no_plots)
    print(render_markdown(report))
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _models_checkpoints(models_file: Path | None, slugs: list[str]) -> dict[str, Path]:
    """The materialized checkpoints of ``slugs`` from a ``models.toml`` (``--models``); incomplete ones are errors."""
    if models_file is None:
        return {}
    from diffserve.engine.models_file import load_models_file, prepare

    prepared = prepare(load_models_file(models_file), slugs=slugs)
    broken = {s: p for s, p in prepared.unavailable().items() if s in slugs}
    if broken:
        raise ValueError("incomplete artifacts (see `diffserve models check`): " + "; ".join(sum(broken.values(), [])))
    return prepared.checkpoints


def cmd_engine(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.engine_bench import EngineBenchConfig, run_engine_bench
    from diffserve.engine.catalog import CATALOG, ValidationError, read_params_argument

    if args.slug not in CATALOG:
        print(f"unknown slug {args.slug!r}; available: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else \
            _models_checkpoints(args.models, [args.slug]).get(args.slug)
        cfg = EngineBenchConfig(
            slug=args.slug, runtimes=tuple(_csv(args.runtime)), device=args.device, precision=args.precision,
            full_size=args.full_size, checkpoint=checkpoint,
            params=read_params_argument(args.params), warmup=args.warmup, repeats=args.repeats,
            stage_repeats=args.stage_repeats,
            baseline=not args.no_baseline, work_dir=Path(args.work_dir) if args.work_dir else _work_dir(),
            threads=args.threads, optimizations=tuple(args.optimize), fp32_reference=args.fp32_reference)
        report = run_engine_bench(cfg)
    except ValidationError as exc:
        print("invalid --params:\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"bench engine: {exc}", file=sys.stderr)
        return 2
    return _finish(report, args)


def cmd_batching(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.batching_bench import run_batching_bench

    try:
        concurrency = tuple(int(c) for c in _csv(args.concurrency))
    except ValueError:
        print(f"bench batching: --concurrency takes comma-separated integers, got {args.concurrency!r}", file=sys.stderr)
        return 2
    report = run_batching_bench(
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, width=args.size, height=args.size,
        steps=args.steps, requests=args.requests, concurrency=concurrency, max_batch=args.max_batch,
        device=args.device, command="diffserve bench " + " ".join(sys.argv[sys.argv.index("batching"):])
        if "batching" in sys.argv else "diffserve bench batching")
    return _finish(report, args)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from diffserve.benchmarks.serve_bench import ServeBenchConfig, run_serve_bench
    from diffserve.engine.catalog import ValidationError, read_params_argument

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise

    try:
        server_checkpoints = {**_models_checkpoints(args.models, _csv(args.slug)), **dict(args.server_checkpoint or [])}
        cfg = ServeBenchConfig(
            slugs=tuple(_csv(args.slug)), url=args.url, start_server=bool(args.start_server),
            server_backend=args.server_backend, server_checkpoints=server_checkpoints, endpoints=tuple(_csv(args.endpoints)), loop=args.loop,
            levels=tuple(args.concurrency if args.loop == "closed" else args.rates),
            requests_per_level=args.requests, min_duration_s=args.duration,
            params=read_params_argument(args.params),
            api_key=args.api_key, poll_interval_s=args.poll_interval, timeout_s=args.timeout,
            triton=args.triton, triton_url=args.triton_url,
            triton_repository=Path(args.triton_repository) if args.triton_repository else None,
            modes=tuple(_csv(args.modes)), triton_runtime=args.triton_runtime,
            triton_pipeline_instances=args.triton_pipeline_instances, fused_variants=tuple(_csv(args.fused_variants)),
            engine_baseline=args.engine_baseline,
            engine_repeats=args.engine_repeats, device=args.device, precision=args.precision,
            work_dir=Path(args.work_dir) if args.work_dir else _work_dir(), seed=args.seed, threads=args.threads,
            predict=args.predict, service_requests=args.service_requests, servers=args.servers)
        report = asyncio.run(run_serve_bench(cfg))
        report["command"] = "diffserve bench " + " ".join(sys.argv[sys.argv.index("serve"):]) if "serve" in sys.argv \
            else "diffserve bench serve"
        report["notes"] += list(args.note or [])
    except ValidationError as exc:
        print("invalid --params:\n  " + "\n  ".join(exc.errors), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"bench serve: {exc}", file=sys.stderr)
        return 2
    return _finish(report, args)


def cmd_capacity(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.capacity import CapacityInputs, QueueingInputs, capacity_report, latest_reports

    plan_args = (args.slo_p95_ms, args.target_rps, args.gpu_hour_usd)
    if not args.arrival_rate and None in plan_args:
        print("bench capacity: give --slo-p95-ms, --target-rps and --gpu-hour-usd (a plan from measured curves), "
              "or --arrival-rate with --gpus or --slo-p95-ms (the queueing model)", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.report] if args.report else latest_reports(Path(args.results_dir)
                                                                               if args.results_dir else None)
    if not paths:
        print("no serve/engine report found: give --report PATH (from `diffserve bench serve` or "
              "`bench engine`)", file=sys.stderr)
        return 2
    try:
        inputs = None
        if None not in plan_args:
            inputs = CapacityInputs(slo_p95_ms=args.slo_p95_ms, target_rps=args.target_rps,
                                    gpu_hour_usd=args.gpu_hour_usd, gpus_per_server=args.gpus_per_server,
                                    max_error_rate=args.max_error_rate)
        queueing = None
        if args.arrival_rate:
            queueing = QueueingInputs(arrival_rates=tuple(args.arrival_rate),
                                      gpus=tuple(int(g) for g in args.gpus or ()), slo_p95_ms=args.slo_p95_ms,
                                      customers=args.customers)
        report = capacity_report(paths, inputs, queueing)
    except ValueError as exc:
        print(f"bench capacity: {exc}", file=sys.stderr)
        return 2
    return _finish(report, args)


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.full_size import save_checkpoint

    try:
        path = save_checkpoint(args.slug, Path(args.out), device=args.device, precision=args.precision)
    except ValueError as exc:
        print(f"bench checkpoint: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.index import results_index, write_results_index
    from diffserve.benchmarks.report import rerender_markdown

    root = Path(args.results_dir) if args.results_dir else None
    if args.rerender:
        for path in rerender_markdown(root):
            print(f"re-rendered: {path}", file=sys.stderr)
    if args.write:
        print(f"written: {write_results_index(root)}", file=sys.stderr)
    print(results_index(root))
    return 0


def _common_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="directory for the JSON, markdown and PNG files (default benchmarks/results)")
    p.add_argument("--name", help="file stem (default: kind-slug-device-...-timestamp)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` with its sub-commands to the ``diffserve`` parser's sub-parsers."""
    bench = sub.add_parser("bench", help="latency, throughput, serving overhead, cost and capacity benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    eng = bsub.add_parser("engine", help="per-stage and end-to-end latency in-process, against diffusers",
                          description="Time one slug's stages and whole requests in-process, and the same request "
                                      "through diffusers' own pipeline over the same modules.")
    eng.add_argument("--slug", required=True, help="model slug, e.g. sd1.5-scifi")
    eng.add_argument("--runtime", default="torch", help="comma list of torch,onnxruntime,tensorrt (default torch)")
    eng.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    eng.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default fp16 on GPU, fp32 on CPU")
    eng.add_argument("--full-size", action="store_true",
                     help="real architectures (benchmarks/configs) with random weights, built on the device")
    eng.add_argument("--checkpoint", help="local diffusers checkpoint (default: the tiny demo checkpoint)")
    eng.add_argument("--models", type=Path, metavar="FILE",
                     help="models file (models.toml): the slug's published artifacts, materialized")
    eng.add_argument("--params", help="JSON (or @file) overriding the reference request, e.g. "
                                      "'{\"num_inference_steps\": 20, \"img_height\": 512}'")
    eng.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    eng.add_argument("--repeats", type=int, default=5, help="timed end-to-end runs (default 5)")
    eng.add_argument("--stage-repeats", type=int, default=10, help="timed calls per stage (default 10)")
    eng.add_argument("--no-baseline", action="store_true", help="skip diffusers' pipeline")
    eng.add_argument("--fp32-reference", action="store_true",
                     help="also run once in eager fp32 and report each entry's max pixel difference from it")
    eng.add_argument("--optimize", action="append", default=[], metavar="SPEC",
                     help="also run torch with these optimizations (repeatable: one entry each), e.g. fast, max, "
                          "fuse_qkv,channels_last,compile=max-autotune-no-cudagraphs")
    eng.add_argument("--work-dir", help="cache for exported artifacts (default $DIFFSERVE_HOME/bench)")
    eng.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 on a shared CPU)")
    _common_output(eng)
    eng.set_defaults(func=cmd_engine)

    srv = bsub.add_parser("serve", help="load generator against `diffserve serve` (and Triton's bls/fused models)",
                          description="Sweep concurrency (closed loop) or offered load (open loop) against the HTTP "
                                      "API's sync and async endpoints and, optionally, Triton's pipeline models "
                                      "in bls and fused mode; report latency percentiles, throughput, errors, the "
                                      "split of each request, and the serving overhead over the in-process engine.")
    target = srv.add_mutually_exclusive_group()
    target.add_argument("--url", help="base URL of a running `diffserve serve`; a comma list (the API replicas of a "
                                      "scaled-out deployment) is sent to in turn")
    target.add_argument("--start-server", nargs="?", const="demo", choices=["demo"],
                        help="start `diffserve serve` on a free loopback port for the run (local backend: the "
                             "tiny demo checkpoints unless --server-checkpoint; triton: on this run's Triton)")
    srv.add_argument("--server-backend", choices=["local", "triton"], default="local",
                     help="backend of the started server (default local)")
    srv.add_argument("--models", type=Path, metavar="FILE",
                     help="models file (models.toml): checkpoints of the started local-backend server")
    srv.add_argument("--server-checkpoint", action="append", type=_slug_dir, metavar="SLUG=DIR",
                     help="checkpoint of the started local-backend server (repeatable), e.g. one written by "
                          "`diffserve bench checkpoint`")
    srv.add_argument("--slug", default="sd1.5-scifi", help="comma list of slugs (default sd1.5-scifi)")
    srv.add_argument("--endpoints", default="sync,async", help="comma list of sync (/v1), async (/v2)")
    srv.add_argument("--loop", choices=["closed", "open"], default="closed",
                     help="closed: N clients back to back; open: Poisson arrivals at --rates")
    srv.add_argument("--concurrency", type=lambda t: [int(x) for x in _floats(t)], default=[1, 2, 4, 8],
                     help="closed-loop levels (default 1,2,4,8)")
    srv.add_argument("--rates", type=_floats, default=[0.5, 1.0, 2.0], help="open-loop requests/s (default 0.5,1,2)")
    srv.add_argument("--requests", type=int, default=16,
                     help="requests per level, at least (closed loop: also at least the concurrency; default 16)")
    srv.add_argument("--duration", type=float, default=0.0, help="keep each level running at least this many s")
    srv.add_argument("--params", help="JSON (or @file) overriding the reference request")
    srv.add_argument("--api-key", help="x-api-key for the API")
    srv.add_argument("--poll-interval", type=float, default=0.05, help="async status polling period in s")
    srv.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s")
    srv.add_argument("--triton", action="store_true",
                     help="also drive Triton's pipeline models directly (gRPC): bls vs fused")
    srv.add_argument("--triton-url", help="gRPC host:port of a running Triton (with --triton-repository)")
    srv.add_argument("--triton-repository", help="model repository (default: the demo repository, built if needed)")
    srv.add_argument("--modes", default="bls,fused", help="pipeline modes to compare (default bls,fused)")
    srv.add_argument("--triton-runtime", choices=["onnxruntime", "torch"], default="onnxruntime",
                     help="runtime of the demo repository's components and fused pipelines (default onnxruntime)")
    srv.add_argument("--triton-pipeline-instances", type=int, default=2,
                     help="instances per pipeline model in the demo repository (default 2)")
    srv.add_argument("--fused-variants", default="", metavar="batched,unbatched,unbatched-x2",
                     help="run the fused mode once per variant: its model reloaded with step batching on or off and "
                          "-xN instances (default: the fused model as built)")
    srv.add_argument("--engine-baseline", default="auto",
                     help="auto: time the request in-process on the server's checkpoint (demo server); "
                          "none; or the path of an engine report")
    srv.add_argument("--engine-repeats", type=int, default=3, help="in-process runs for the overhead baseline")
    srv.add_argument("--device", help="device of the in-process baseline and started server")
    srv.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    srv.add_argument("--seed", type=int, default=0, help="seed of the open-loop arrival process")
    srv.add_argument("--predict", action="store_true",
                     help="open loop: time --service-requests requests back to back first, then report the "
                          "queueing model's predicted p95 beside the measured p95 at each rate")
    srv.add_argument("--service-requests", type=int, default=16,
                     help="requests timed back to back for the service-time distribution (default 16)")
    srv.add_argument("--servers", type=int, default=1,
                     help="servers the queueing model assumes: workers x DIFFSERVE_MAX_CONCURRENT_JOBS (default 1)")
    srv.add_argument("--threads", type=int, help="CPU threads for torch/ORT here, in the started server and Triton")
    srv.add_argument("--work-dir", help="cache directory (default $DIFFSERVE_HOME/bench)")
    srv.add_argument("--note", action="append", help="a note to record with the results (repeatable), e.g. what "
                                                     "else loaded the machine")
    _common_output(srv)
    srv.set_defaults(func=cmd_serve)

    bat = bsub.add_parser("batching", help="images/s and p50/p95 at concurrency 1-8, step-batched vs not, in-process",
                          description="Closed-loop clients into one set of sd1.5-scifi torch components, each "
                                      "request alone or through one StepBatcher (diffserve.engine.batching).")
    bat.add_argument("--checkpoint", help="an SD1.5 checkpoint directory (default: the tiny demo checkpoint)")
    bat.add_argument("--size", type=int, default=512, help="width and height (default 512, the catalog's smallest)")
    bat.add_argument("--steps", type=int, default=20, help="denoising steps (default 20, the catalog's fewest)")
    bat.add_argument("--requests", type=int, default=3, help="requests per client thread (default 3)")
    bat.add_argument("--concurrency", default="1,2,4,8", help="comma list of client threads (default 1,2,4,8)")
    bat.add_argument("--max-batch", type=int, default=16, help="StepBatcher max_batch in UNet rows (default 16)")
    bat.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    _common_output(bat)
    bat.set_defaults(func=cmd_batching)

    cap = bsub.add_parser("capacity", help="$ per 1000 images and GPUs needed, from measured curves",
                          description="Turn serving sweeps (or engine results) into the per-GPU throughput that "
                                      "meets a p95 objective, the GPUs a target request rate needs, and $ per "
                                      "1000 images at a GPU-hour price; with --arrival-rate, predict p95 latency "
                                      "for an arrival rate and a number of GPUs with an M/G/c queueing model "
                                      "(a simulation over the measured service-time distribution).")
    cap.add_argument("--report", action="append", help="serve or engine report JSON (repeatable; default: the "
                                                       "newest serve report per slug in the results directory)")
    cap.add_argument("--results-dir", help="where to look for reports (default benchmarks/results)")
    cap.add_argument("--slo-p95-ms", type=float, help="p95 latency objective in ms")
    cap.add_argument("--target-rps", type=float, help="request rate to plan for (plan from measured curves)")
    cap.add_argument("--gpu-hour-usd", type=float, help="price of one GPU-hour in $ (plan from measured curves)")
    cap.add_argument("--arrival-rate", type=_floats, metavar="R[,R...]",
                     help="queueing model: predict p95 latency at these Poisson arrival rates (requests/s) from "
                          "the report's service-time samples (a serve report: closed-loop concurrency 1 or the "
                          "calibration of `bench serve --predict`)")
    cap.add_argument("--gpus", type=lambda t: [int(x) for x in _floats(t)], metavar="N[,N...]",
                     help="queueing model: numbers of GPUs (one request at a time each); default: the fewest "
                          "that meet --slo-p95-ms")
    cap.add_argument("--customers", type=int, default=100_000,
                     help="requests simulated per prediction (default 100000)")
    cap.add_argument("--gpus-per-server", type=int, default=1, help="GPUs behind the measured server (default 1)")
    cap.add_argument("--max-error-rate", type=float, default=0.0, help="error rate tolerated at a level (default 0)")
    _common_output(cap)
    cap.set_defaults(func=cmd_capacity)

    ckp = bsub.add_parser("checkpoint", help="write a full-size random-weight checkpoint (for export and serve)",
                          description="Save a slug's full-size networks (benchmarks/configs) with random weights as "
                                      "a diffusers directory, so `diffserve export` and `diffserve serve "
                                      "--checkpoint` (and so `bench serve`) run on the real shapes.")
    ckp.add_argument("--slug", required=True, help="sd1.5-scifi, sd1.5-img2img or segmind-vega")
    ckp.add_argument("--out", required=True, help="directory to write")
    ckp.add_argument("--device", help="where to build the networks (cuda is much faster)")
    ckp.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="dtype of the saved weights")
    ckp.set_defaults(func=cmd_checkpoint)

    rep = bsub.add_parser("report", help="the results table (newest result per slug and setting) with the floors")
    rep.add_argument("--results-dir", help="default benchmarks/results")
    rep.add_argument("--write", action="store_true", help="also write it to <results-dir>/README.md")
    rep.add_argument("--rerender", action="store_true",
                     help="rewrite every result's markdown from its JSON (after a change of the tables)")
    rep.set_defaults(func=cmd_report)

    sto = bsub.add_parser("store", help="submit latency of the SQLite job store, synchronous=FULL vs NORMAL",
                          description="Time the job-row commit a POST /v2 waits for with SQLite "
                                      "synchronous=FULL and NORMAL; prints a markdown table.")
    sto.add_argument("--jobs", type=int, default=500, help="creates per mode (default 500)")
    sto.add_argument("--dir", type=Path, help="where the databases go (default: the system temp dir); "
                                              "use the disk DIFFSERVE_DATA_DIR lives on")
    sto.set_defaults(func=cmd_store)


def cmd_store(args: argparse.Namespace) -> int:
    from diffserve.benchmarks.store_bench import run

    print(run(args.jobs, args.dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffserve.benchmarks.cli", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
