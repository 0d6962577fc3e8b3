#!/usr/bin/env bash
# The GPU figures of issues 24 and 21 in ONE device call (at most 9 minutes): full-size random-weight
# networks (benchmarks/configs/), diffusers fp16 vs our eager fp16 vs our `fast` preset (fused QKV,
# channels-last, torch.compile, CUDA graphs, device scheduler) in the same process, most valuable first:
#
#   segmind-vega 1024x1024, 25 steps, UniPC, CFG 9
#   sd1.5-scifi  512x768, 30 steps, dpmpp_2m, CFG 5 (VAE fp16 on both sides: like for like)
#   the UNets' throughput against batch size (SD1.5 512², Vega 1024², 1-16 images per call)
#   if time is left: step-level batching of whole requests, batched vs unbatched at concurrency 1-16
#   (SD1.5 512² 20 steps, Vega 1024² 10 steps); ominicontrol 512x512, 8 steps, bf16; omni-zero
#   1024x1024, 10 steps (networks only); sd1.5-scifi 512x512
#
# The plan, the time guard and the summary are benchmarks/gpu/runner.py. Each step is its own
# process with the time left as its limit and writes its report after every entry; a step that
# cannot start before the deadline (BUDGET_S, default 480 s from this script's start) is skipped,
# one cut off keeps the entries it finished. After each step $OUT/summary.{json,md} and
# $OUT/steps.tar (every step's JSON) are rewritten, so a cut-off call still returns what it
# measured; $OUT/run.log is the whole log. STEPS=name,slug,... reruns part of the plan.
#
#   DRY_RUN=1 bash benchmarks/gpu/run.sh     # the same plan and code on the CPU: tiny configs
#                                            # (benchmarks/configs/tiny), fp32, 2 steps (or the catalog minimum), 1 run
#
# The device machine (Python 3.12, CUDA torch 2.11, transformers, onnx, onnxruntime) has no
# diffusers and no package registry: carry the wheels in .whl/ (ignored by git), prepared here with
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
#
# (6.4 MB; diffusers' other needs — huggingface-hub>=1.32, safetensors>=0.8, filelock, regex,
# requests, Pillow, numpy, zipp — are on the machine), then, from the session's checkout:
#
#   run(command="GIT_COMMIT=<hash> bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=540)
#
# and unpack $OUT/steps.tar into benchmarks/results/.
#
# benchmarks/README.md ("GPU run") says what to commit afterwards.
set -uo pipefail
export RUN_STARTED=${RUN_STARTED:-$(date +%s)}
cd "$(dirname "$0")/../.."

if [[ ${DRY_RUN:-0} != 0 ]]; then
    py=${PYTHON:-python3}
    OUT=${OUT:-$(mktemp -d /tmp/diffserve-gpu-dry.XXXXXX)}
    if [[ -z ${DIFFSERVE_HOME:-} ]]; then
        DIFFSERVE_HOME=$(mktemp -d /tmp/diffserve-gpu-dry-home.XXXXXX)
        trap 'rm -rf "$DIFFSERVE_HOME"' EXIT
    fi
    export DIFFSERVE_HOME
else
    py=${PYTHON:-python3}
    OUT=${OUT:-benchmarks/results/gpu-run}
    export DIFFSERVE_HOME=${DIFFSERVE_HOME:-/tmp/diffserve}
    if ! "$py" -c "import diffusers" 2>/dev/null; then
        if ! compgen -G ".whl/*.whl" >/dev/null; then
            echo "run.sh: diffusers is not importable and .whl/ holds no wheels. Prepare them here with" >&2
            echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\" >&2
            echo "      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\" >&2
            echo "      -d .whl diffusers==0.42.1 importlib_metadata==8.7.0" >&2
            echo "and name .whl in the run's carry (see the header of this script)." >&2
            exit 3
        fi
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "run.sh: installing the carried wheels failed" >&2; exit 3; }
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    fi
fi
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT"
{
    echo "run.sh: OUT=$OUT DRY_RUN=${DRY_RUN:-0} BUDGET_S=${BUDGET_S:-default} STEPS=${STEPS:-all} commit=${GIT_COMMIT:-?}"
    [[ ${DRY_RUN:-0} != 0 ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # The versions from the packages' metadata: importing torch, diffusers and transformers here cost
    # seconds of the budget that every step's own process pays again.
    "$py" -c "import sys; from importlib.metadata import version as v; print('python', sys.version.split()[0], *(f'{p} {v(p)}' for p in ('torch', 'diffusers', 'transformers')))"
    "$py" -m diffserve.benchmarks.gpu.runner --out "$OUT"
} 2>&1 | tee "$OUT/run.log"
