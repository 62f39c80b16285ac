#!/usr/bin/env bash
# fedmoe under `accelerate launch` (torchrun-style ranks; see docs/distributed.md, "torchrun and accelerate launch").
#   launch/accelerate.sh [ACCELERATE OPTIONS --] run --config F --out DIR [--set ...]
#   launch/accelerate.sh --num_processes 8 -- resume DIR
# Options before `--` go to accelerate (they override launch/accelerate.yaml); the rest to
# `fedmoe`. On a CPU-only machine DeepSpeed and the cross-group comms use gloo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
accel=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do accel+=("$1"); shift; done
  shift
fi
cd "$here/.."
exec "${ACCELERATE:-accelerate}" launch --config_file "${ACCELERATE_CONFIG:-$here/accelerate.yaml}" \
  "${accel[@]}" -m pipeline.cli "$@"
