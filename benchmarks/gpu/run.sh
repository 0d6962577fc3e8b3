#!/usr/bin/env bash
# The prepared GPU check of the fast path (issue 6) and the GPU engine results (issue 5), one slug
# per device call so each fits the 10-minute command limit:
#
#   bash benchmarks/gpu/run.sh sd1.5-scifi     # 512x512 (the published 104.6 it/s size), 30 steps,
#                                              # dpmpp_2m, CFG 5 (the seed example, 512 high)
#   bash benchmarks/gpu/run.sh segmind-vega    # 1024², 25 steps, UniPC, CFG 9
#
# Full-size random-weight networks in fp16: eager torch, eager with the device scheduler, the `fast`
# optimisations (fused QKV, channels-last, torch.compile, CUDA graphs, device scheduler) and
# diffusers' own pipeline in one run, with the optimised-vs-eager pixel difference, the loop
# overhead per step, it/s and the fraction of the compute floor. A SPEC argument runs that spec
# alone instead of the two. Results land in $OUT (else benchmarks/results/).
#
# The GPU machine has torch 2.11, transformers 5.17 and numpy 2.5 but not diffusers: carry
# `.whl/` (see /work/.library/device/README.md) holding diffusers 0.42.1, importlib_metadata 8.7.0,
# torchsde 0.2.6 and trampoline 0.1.2 (the last two for omni-zero):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.0 \
#       torchsde==0.2.6 trampoline==0.1.2
# `bench engine` was run on CPU with those versions (numpy 2.4, transformers 5.17) and without the
# serving packages the machine lacks (fastapi, pydantic, tritonclient, pytriton): it needs none.
set -euo pipefail
slug=${1:-sd1.5-scifi}
# nowarmup: the request's shape compiles in the bench's own warm-up runs, and the slug-default
# shapes (which the benchmark request does not use) are not compiled at all: minutes saved.
specs=(--optimize device_scheduler --optimize fast,nowarmup)
[[ $# -ge 2 ]] && specs=(--optimize "$2")
params=()
[[ $slug == sd1.5-scifi ]] && params=(--params '{"img_height": 512}')
out=${OUT:-benchmarks/results}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 DIFFSERVE_HOME=${DIFFSERVE_HOME:-/tmp/diffserve}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m benchmarks.cli engine --slug "$slug" --full-size --device cuda --precision fp16 \
    "${specs[@]}" "${params[@]}" --fp32-reference --warmup 2 --repeats 5 --stage-repeats 10 --out "$out" --no-plots
