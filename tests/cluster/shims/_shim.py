"""Shared by the local SLURM stand-ins in this directory (sbatch, srun, scontrol): tests only.

They run everything on this machine: `sbatch` runs the batch script in the foreground, `srun`
starts the ranks with MPICH's `mpiexec` (Hydra) so MPI sees one world, `scontrol requeue`
records the request. State (job ids, the requeue record) lives in $SHIM_STATE_DIR.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path


def state_dir() -> Path:
    path = Path(os.environ.get("SHIM_STATE_DIR") or f"/tmp/slurm-shim-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_options(words: list[str], takes_value: set[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(option, value) pairs up to the first non-option word, and the words from there on.
    `--key=value`; `--key value` and `-k value` / `-kvalue` for options in `takes_value`."""
    opts: list[tuple[str, str | None]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return opts, words[i + 1:]
        if not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            if "=" in word:
                key, value = word.split("=", 1)
                opts.append((key, value))
            elif word in takes_value and i + 1 < len(words):
                opts.append((word, words[i + 1]))
                i += 1
            else:
                opts.append((word, None))
        else:
            key = word[:2]
            if key in takes_value:
                if len(word) > 2:
                    opts.append((key, word[2:].lstrip("=")))
                elif i + 1 < len(words):
                    opts.append((key, words[i + 1]))
                    i += 1
            else:
                opts.append((key, None))
        i += 1
    return opts, words[i:]


def expand_pattern(pattern: str, job_id: str, job_name: str = "", task: str = "0") -> str:
    """SLURM's filename patterns used here: %j, %J, %x, %t, %n, %s, %%."""
    table = {"j": job_id, "J": job_id, "x": job_name, "t": task, "n": "0", "N": "localhost",
             "s": "0", "%": "%"}
    return re.sub(r"%([jJxtnNs%])", lambda m: table[m.group(1)], pattern)


def sbatch_directives(script: Path) -> list[list[str]]:
    """The #SBATCH words of each het-job component (one component without `#SBATCH hetjob`);
    like sbatch, parsing stops at the first line that is neither blank nor a comment."""
    components: list[list[str]] = [[]]
    for line in script.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if not stripped.startswith("#SBATCH"):
            continue
        words = shlex.split(stripped[len("#SBATCH"):], comments=True)
        if words in (["hetjob"], ["packjob"]):
            components.append([])
        else:
            components[-1].extend(words)
    return components


def node_names(nodelist: str) -> list[str]:
    """`node[0-2,5]` -> node0 node1 node2 node5 (one bracket group)."""
    names = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            names.append(part)
            continue
        for item in m.group(2).split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                names.append(f"{m.group(1)}{n:0{len(lo)}d}")
    return names
