#!/usr/bin/env bash
# The GPU measurements the CPU machine cannot make, in one call (about 8 minutes on one H200):
#   0. the CUDA tests (the block's grouped_mm paths, activation checkpointing's memory)
#   1. the MoE block like for like (ours vs Hugging Face + peft's expert LoRA) at OLMoE dims
#   2. the local step per tier at OLMoE-1B-7B shapes, with tokens/s and MFU
#   3. a whole killed-and-resumed run at OLMoE-1B-7B shapes: plan vs measured memory, time split
# Each writes its log to OUT (default bench/) as results-<gpu>-<name>.txt, command line first.
#   bash bench/gpu_checks.sh [OUT]
# On an offline image without DeepSpeed: `bash bench/gpu_wheels.sh` where PyPI is reachable,
# bring .whl/ along, and this installs it into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-bench}
py=${PYTHON:-python3}
gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null) || {
    echo "gpu_checks.sh: no CUDA GPU visible" >&2; exit 2; }
if ! "$py" -c "import deepspeed" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || {
        echo "gpu_checks.sh: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
"$py" -c "import deepspeed, transformers" 2>/dev/null || {
    echo "gpu_checks.sh: deepspeed or transformers missing (bash bench/gpu_wheels.sh, then bring .whl/)" >&2; exit 2; }
mkdir -p "$out"
run() {  # NAME TIMEOUT ARGS...: one check, its log, a line saying how it ended
    local name=$1 limit=$2; shift 2
    local log="$out/results-$gpu-$name.txt"
    echo "# $* ($(date -u +%F), $("$py" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'))" > "$log"
    timeout "$limit" "$@" 2>&1 | grep -v -e Warning -e "^\[.*WARNING" >> "$log"
    local rc=${PIPESTATUS[0]}
    echo "# exit $rc" >> "$log"
    echo "$name: exit $rc, $log"
}
run cuda-tests 120 "$py" -m pytest -q -p no:cacheprovider tests/model/test_cuda.py
run moe-block-peft 150 "$py" bench/moe_block.py --device cuda --dtype bfloat16 --tokens 65536 \
    --hidden 2048 --intermediate 1024 --experts 64 --top-k 8
run tier-step-mfu 150 "$py" bench/tier_step.py --model olmoe-1b-7b --batch 16 --seq 1024 --top-k 8 6 4 2 --steps 6
# --top-gpu-gb 60: the top-8 tier (about 72 GiB without checkpointing) trains checkpointed under auto
run scale-run 300 "$py" bench/scale_run.py --model olmoe-1b-7b --batch 16 --seq 1024 --steps 3 --top-gpu-gb 60
