"""Full size end to end on one host: random full-size weights -> export -> Triton -> real HTTP requests.

``python -m diffserve.benchmarks.full_size_e2e --slugs sd1.5-scifi,sd1.5-img2img --work-dir DIR`` runs, as a new user
would, each step as its own ``diffserve`` process: ``bench checkpoint``'s writer (full-size random weights,
``diffserve.benchmarks.full_size.save_checkpoint``), ``diffserve export --model ...`` (the deployment defaults: fused
only, one instance), ``diffserve serve --repository`` (Triton and the API), then one ``POST /v1/<slug>`` per
slug at 512x512 (1024² for Vega), 20 steps. It writes one JSON: export seconds and peak RSS of the export
process, seconds until the server was ready (Triton's load), each request's latency, the peak RSS of the
serving process tree, and whether each image is finite and not uniform. ``--tiny`` runs the same wiring
on the tiny demo checkpoints (what the test runs); the full-size run's memory and time are in its results
(``benchmarks/results/``) and the README.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffserve.benchmarks.figures import all_figures, figures
from diffserve.engine.processes import ChildProcess

logger = logging.getLogger(__name__)


def sizes() -> dict[str, int]:
    """The slugs this runs and each one's (square) request size, as their families state them
    (``BenchmarkFigures.e2e_size``)."""
    return {slug: fig.e2e_size for slug, _, fig in all_figures() if fig.e2e_size}


SIZES = sizes()


def write_checkpoints(slugs: list[str], work_dir: Path, tiny: bool) -> dict[str, Path]:
    """One checkpoint per architecture (the two SD1.5 slugs share one, as a deployment of one fine-tune would)."""
    if tiny:
        from diffserve.engine.tiny.demo import demo_checkpoints

        return {s: p for s, p in demo_checkpoints().items() if s in slugs}
    from diffserve.benchmarks.full_size import SLUG_ARCHITECTURES, save_checkpoint

    out = {}
    for slug in slugs:
        # Slugs with the same full-size networks share one checkpoint, named by its denoiser's config.
        path = work_dir / "checkpoints" / SLUG_ARCHITECTURES[slug]["unet"]
        if not (path / "diffserve_full_size.json").is_file():
            save_checkpoint(slug, path, device="cpu", precision="fp32")
        out[slug] = path
    return out


def _run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with status {rc}; see {log}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: exact when this one is the largest.
    return seconds, max(peak_kib, before) / 2**20


class ServingRss:
    """Peak summed RSS of a process and its descendants (the API, Triton, its python stubs), sampled."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s, self.peak_gib = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_gib = max(self.peak_gib, total / 2**30)
            except psutil.Error:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ServingRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _input_image(size: int) -> str:
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    array = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def payload(slug: str) -> dict[str, Any]:
    size = SIZES[slug]
    body: dict[str, Any] = {"prompt": "a futuristic city at dusk", "img_width": size, "img_height": size,
                            "num_inference_steps": 20, "samples": 1, "seed": 7, "base64": False}
    if figures(slug).img2img:
        body.update(image=_input_image(size), strength=0.75)
    return body


def image_checks(content: bytes) -> dict[str, Any]:
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.float32)
    return {"shape": list(array.shape), "finite": bool(np.isfinite(array).all()),
            "not_uniform": bool(array.std() > 0), "std": round(float(array.std()), 3)}


def serve_and_request(repository: Path, slugs: list[str], log: Path, timeout_s: float) -> dict[str, Any]:
    import httpx

    cmd = [sys.executable, "-m", "diffserve.api.cli", "serve", "--repository", str(repository), "--port", "0"]
    t0 = time.perf_counter()
    log.unlink(missing_ok=True)  # this run's output only
    server = ChildProcess(cmd, name="diffserve serve", log=log).start()
    result: dict[str, Any] = {"requests": {}}
    try:
        with ServingRss(server.pid) as rss:
            # ChildNotReady (a RuntimeError) names the exit status or the timeout, the log and its tail
            line = server.wait_ready("ready at", timeout_s) or ""
            url = line.split("ready at", 1)[1].split()[0]
            result["ready_s"] = round(time.perf_counter() - t0, 1)
            with httpx.Client(base_url=url, timeout=timeout_s) as client:
                for slug in slugs:
                    t1 = time.perf_counter()
                    response = client.post(f"/v1/{slug}", json=payload(slug))
                    latency = time.perf_counter() - t1
                    if response.status_code != 200:
                        raise RuntimeError(f"{slug}: HTTP {response.status_code}: {response.text[:500]}")
                    result["requests"][slug] = {"latency_s": round(latency, 2), **image_checks(response.content)}
        result["serving_peak_rss_gib"] = round(rss.peak_gib, 2)
    finally:
        server.stop(120)
    return result


def run(slugs: list[str], work_dir: Path, *, tiny: bool = False, timeout_s: float = 6 * 3600) -> dict[str, Any]:
    from diffserve.benchmarks.environment import environment

    work_dir.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    checkpoints = write_checkpoints(slugs, work_dir, tiny)
    checkpoint_s = time.perf_counter() - t0
    repository = work_dir / "repository"
    cmd = [sys.executable, "-m", "diffserve.api.cli", "export", "--repository", str(repository), "--device", "cpu"]
    keys: dict[Path, str] = {}  # slugs on one checkpoint share its key (and nothing else: fused loads per slug)
    for slug, path in checkpoints.items():
        key = keys.setdefault(Path(path).resolve(), slug.replace("-", "_").replace(".", "_"))
        cmd += ["--model", f"{slug}={path}:{key}"]
    export_s, export_rss = _run_measured(cmd, work_dir / "export.log")
    from diffserve.triton_serving.manifest import read_manifest

    manifest = read_manifest(repository)
    served = serve_and_request(repository, slugs, work_dir / "serve.log", timeout_s)
    weights = sum(f.stat().st_size for root in {Path(p).resolve() for p in checkpoints.values()}
                  for f in root.rglob("*.safetensors")) / 2**30
    return {"kind": "full-size-e2e", "tiny": tiny, "slugs": slugs, "host_cpus": os.cpu_count(),
            "environment": environment(), "load_average": {"start": load_at_start, "end": os.getloadavg()},
            "weights_gib": round(weights, 4),
            "checkpoint_s": round(checkpoint_s, 1), "export_s": round(export_s, 1),
            "export_peak_rss_gib": round(export_rss, 2),
            "export_peak_rss_over_weights": round(export_rss / weights, 2) if weights else None,
            "repository": {"pipelines": sorted(manifest["pipelines"]), "components": sorted(manifest["components"]),
                           "engine_options": manifest.get("engine_options", {})},
            "triton_ready_s": served["ready_s"], "serving_peak_rss_gib": served["serving_peak_rss_gib"],
            "requests": served["requests"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slugs", default="sd1.5-scifi,sd1.5-img2img", help=f"comma separated, of {', '.join(SIZES)}")
    parser.add_argument("--work-dir", type=Path, required=True, help="checkpoints, repository, logs")
    parser.add_argument("--out", type=Path, help="the JSON (default: WORK_DIR/full-size-e2e.json)")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo checkpoints (wiring check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    slugs = [s for s in args.slugs.split(",") if s]
    unknown = sorted(set(slugs) - set(SIZES))
    if unknown:
        parser.error(f"unknown slugs {unknown}; choose from {', '.join(SIZES)}")
    report = run(slugs, args.work_dir, tiny=args.tiny)
    out = args.out or args.work_dir / "full-size-e2e.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(r["finite"] and r["not_uniform"] for r in report["requests"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
