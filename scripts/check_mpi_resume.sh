#!/usr/bin/env bash
# Kill a run hard in the middle of a round under mpiexec, resume it, and compare its final
# adapters and per-client state with an uninterrupted run of the same config, bit for bit.
#   scripts/check_mpi_resume.sh RANKS KILL_ROUND OUT_DIR [--set KEY=VALUE ...]
# Example (the default config, 4 ranks, FedSmoothLoRA; two runs of ~5 min on 2 cores):
#   scripts/check_mpi_resume.sh 4 4 /tmp/fsl --set algorithm.name=fedsmoothlora
set -euo pipefail
[[ $# -ge 3 ]] || { echo "usage: $0 RANKS KILL_ROUND OUT_DIR [--set KEY=VALUE ...]" >&2; exit 2; }
ranks=$1 kill_round=$2 out=$3; shift 3
cd "$(dirname "$0")/.."
py=.venv/bin/python
mpi=(.venv/bin/mpiexec -n "$ranks" "$py" -m mpi4py -m pipeline.cli)
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[[ -e $out ]] && { echo "$out: exists; choose a new directory" >&2; exit 2; }
mkdir -p "$out"
"${mpi[@]}" run --out "$out/whole" "$@" --set logging.progress=false > "$out/whole.log" 2>&1
"${mpi[@]}" run --out "$out/killed" "$@" --set logging.progress=false > "$out/killed.log" 2>&1 &
pid=$!
metrics=$out/killed/metrics.jsonl
until [[ $(grep -c "\"client\", \"round\": $kill_round," "$metrics" 2>/dev/null) -ge 2 ]]; do sleep 0.5; done
pkill -9 -f -- "--out $out/killed" || true
wait $pid || true
echo "killed after $(grep -c "\"client\", \"round\": $kill_round," "$metrics") client updates of round $kill_round"
"${mpi[@]}" resume "$out/killed" >> "$out/killed.log" 2>&1
"$py" - "$out" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

whole, killed = Path(sys.argv[1]) / "whole", Path(sys.argv[1]) / "killed"
def same(a, b):
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
ok = same(whole / "final" / "adapter.safetensors", killed / "final" / "adapter.safetensors")
print("final adapters bitwise equal:", ok)
if (whole / "client_state").is_dir():
    names = sorted(p.name for p in (whole / "client_state").iterdir())
    states = names == sorted(p.name for p in (killed / "client_state").iterdir()) and all(
        same(whole / "client_state" / n, killed / "client_state" / n) for n in names)
    print(f"per-client state ({len(names)} files) bitwise equal:", states)
    ok &= states
sys.exit(0 if ok else 1)
PY
