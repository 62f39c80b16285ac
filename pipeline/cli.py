"""`fedmoe` command line: parse, validate, hand over to federation/commands. No training logic here."""
from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from pipeline.errors import Interrupted, RetryableError, UserError


def _quiet_libraries() -> None:
    """Library chatter (DeepSpeed INFO lines, transformers notices) would bury the progress view."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import transformers
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                   errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def writable_file(path: str, flag: str) -> Path:
    """A file this process can create or replace, checked before the work that produces it."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable (read-only or no permission)")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoe", description=(
        "Resource-adaptive federated fine-tuning of Mixture-of-Experts models."))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start a federated run")
    run.add_argument("--config", default=None, help="YAML experiment (default: configs/default.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set federation.rounds=4 (repeatable)")
    run.add_argument("--out", default=None, help="run directory (default: runs/<algorithm>-seed<seed>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    resume = sub.add_parser("resume", help="continue a killed run from its latest checkpoint")
    resume.add_argument("run_dir")

    ev = sub.add_parser("eval", help="evaluate a run's latest checkpoint (its final state once finished), "
                        "or with --model any OLMoE directory on a run's or a config's benchmark and tiers")
    ev.add_argument("run_dir", nargs="?", default=None)
    ev.add_argument("--model", default=None, metavar="DIR", help="a Hugging Face OLMoE directory to evaluate")
    ev.add_argument("--adapter", default=None, metavar="DIR", help="with --model: a peft LoRA adapter to load onto it")
    ev.add_argument("--config", default=None, help="with --model and no run: the YAML whose benchmark and tiers to use")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --model and no run: override a config field (repeatable)")
    ev.add_argument("--checkpoint", default=None, help="a checkpoint directory instead of checkpoints/latest")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the per-tier results as JSON")
    ev.add_argument("--top-k", dest="top_ks", action="append", default=[], metavar="K",
                    help="evaluate every tier at K experts per token instead of its own (repeatable)")
    ev.add_argument("--mode", default=None, metavar="choice|generate",
                    help="option log-likelihood or greedy generation + answer extraction (default: the run's eval.mode)")

    cmp_ = sub.add_parser("compare", help="run methods x seeds from a spec and write a comparison table")
    cmp_.add_argument("spec", help="comparison spec, e.g. configs/compare/benchmark.yaml")
    cmp_.add_argument("--out", default="runs/compare", help="directory for the runs and compare.md")
    cmp_.add_argument("--jobs", type=int, default=2, help="runs in parallel (threads split evenly)")
    cmp_.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="extra override applied to every run (repeatable)")
    cmp_.add_argument("--force", action="store_true",
                      help="train again the runs whose recorded config differs from the spec's (default: exit 2)")
    cmp_.add_argument("--mode", default=None, metavar="choice|generate",
                      help="score every final checkpoint again in this evaluation mode (compare-MODE.md)")
    cmp_.add_argument("--report-only", action="store_true",
                      help="train nothing: report the methods whose every seed has finished, name the rest")

    plan = sub.add_parser("plan", help="print the MPI layout (client groups, their ranks and clients); runs nothing")
    plan.add_argument("--config", default=None, help="YAML experiment (default: configs/default.yaml)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable)")
    plan.add_argument("--ranks", type=int, required=True, help="MPI world size the run will have")
    plan.add_argument("--rounds", type=int, default=3, help="rounds whose client assignment is shown")
    plan.add_argument("--sbatch", action="store_true",
                      help="also print the SLURM resources (#SBATCH lines) and an sbatch command (slurm/)")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per cluster node, for --sbatch")

    ex = sub.add_parser("export", help="a run's result as a peft adapter or a merged model, with a model card")
    ex.add_argument("run_dir")
    ex.add_argument("--format", required=True, metavar="peft|merged", help="peft adapter or merged Hugging Face model")
    ex.add_argument("--tier", default=None, metavar="NAME", help="at this tier's top-k and rank (default: full)")
    ex.add_argument("--out", required=True, metavar="DIR", help="a new or empty directory")

    report = sub.add_parser("report", help="rewrite RUN/report.md and RUN/plots/ from metrics.jsonl")
    report.add_argument("run_dir")
    return parser


def _top_ks(values: list[str]) -> list[int]:
    """--top-k values as integers; parsed here, not by argparse, so a bad one is one line, exit 2."""
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise UserError(f"--top-k: expected an integer, got {v!r}") from None
    return list(dict.fromkeys(out))  # repeated values evaluated once, in the order given


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and args.out:  # before the slow imports
            from pipeline.federation.rundir import check_out

            check_out(Path(args.out))
        return _dispatch(args, argv)
    except UserError as exc:
        print(f"fedmoe: error: {exc}", file=sys.stderr)
        return 2
    except RetryableError as exc:  # the message says how to retry
        print(f"fedmoe: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # the message says how to continue
        print(f"fedmoe: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRORS:
            raise
        return _storage_error(args, exc.filename, exc.strerror or str(exc))
    except Exception as exc:
        # safetensors reports a failed write (a full disk) as its own error, errno in the text
        io = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", str(exc))
        if type(exc).__name__ != "SafetensorError" or io is None:
            raise
        return _storage_error(args, None, io.group(1))
    except KeyboardInterrupt:
        print("fedmoe: interrupted; `fedmoe resume RUN_DIR` continues from the last checkpoint",
              file=sys.stderr)
        return 130


def _storage_error(args: argparse.Namespace, filename, reason: str) -> int:
    """A full disk, a read-only directory, no permission: the user's to fix, so one line. A run
    stays resumable from its last complete checkpoint."""
    run = getattr(args, "out", None) or getattr(args, "run_dir", None)
    where = filename or run
    hint = ""
    if args.command in ("run", "resume") and run and (Path(run) / "checkpoints" / "latest").is_file():
        hint = f"; once fixed, `fedmoe resume {run}` continues from its last checkpoint"
    print(f"fedmoe: error: {f'{where}: ' if where else ''}{reason}{hint}", file=sys.stderr)
    return 2


def _eval_config(args: argparse.Namespace):
    """`fedmoe eval`'s flags checked together; with --model, the config whose benchmark and
    tiers it uses (the run's, or --config/--set); None for a run's own evaluation."""
    from pipeline.config import load_config

    if args.model is None:
        for flag, value in (("--adapter", args.adapter), ("--config", args.config), ("--set", args.overrides)):
            if value:
                raise UserError(f"{flag}: only with --model")
        if args.run_dir is None:
            raise UserError("eval: give a run directory, or --model DIR")
        return None
    if args.checkpoint:
        raise UserError("--checkpoint: not with --model (it evaluates the model directory)")
    if args.run_dir is not None:
        if args.config or args.overrides:
            raise UserError("--config/--set: not with a run directory (its config is used)")
        from pipeline.federation.rundir import run_config

        return run_config(Path(args.run_dir))
    return load_config(args.config, args.overrides)


def _dispatch(args: argparse.Namespace, argv: list[str] | None) -> int:
    from pipeline.config import EVAL_MODES, load_config

    if args.command == "run":
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.algorithm.name}-seed{cfg.seed}"
        _quiet_libraries()
        from pipeline.federation.commands import start_run
        from pipeline.federation.rounds import RoundFailed

        try:
            start_run(cfg, out, args.overwrite)
        except RoundFailed as exc:
            print(f"fedmoe: {exc}; resume with `fedmoe resume {out}`", file=sys.stderr)
            return 1
        return 0
    if args.command == "resume":
        _quiet_libraries()
        from pipeline.federation.commands import resume_run
        from pipeline.federation.rounds import RoundFailed

        try:
            resume_run(Path(args.run_dir))
        except RoundFailed as exc:
            print(f"fedmoe: {exc}; resume again with `fedmoe resume {args.run_dir}`", file=sys.stderr)
            return 1
        return 0
    if args.command == "eval":
        if args.mode is not None and args.mode not in EVAL_MODES:  # before any import or load
            raise UserError(f"--mode: must be choice or generate, got {args.mode!r}")
        _top_ks(args.top_ks)
        cfg = _eval_config(args)  # before any import or load
        json_out = writable_file(args.json, "--json") if args.json else None  # before the evaluation
        _quiet_libraries()
        if args.model:
            from pipeline.federation.external_eval import evaluate_model

            rows = evaluate_model(cfg, Path(args.model), Path(args.adapter) if args.adapter else None,
                                  top_ks=_top_ks(args.top_ks), mode=args.mode)
        else:
            from pipeline.federation.evaluation import evaluate_run

            rows = evaluate_run(Path(args.run_dir), Path(args.checkpoint) if args.checkpoint else None,
                                top_ks=_top_ks(args.top_ks), mode=args.mode)
        if json_out:
            try:
                json_out.write_text(json.dumps(rows, indent=1))
            except OSError as exc:
                raise UserError(f"--json {json_out}: {exc.strerror or exc}") from None
        return 0
    if args.command == "export":
        from pipeline.federation.export_run import check_export_args

        run_dir, out = Path(args.run_dir), Path(args.out)
        check_export_args(run_dir, args.format, args.tier, out)  # before the slow imports
        _quiet_libraries()
        from pipeline.federation.export_run import export_run

        command = "fedmoe " + " ".join(sys.argv[1:] if argv is None else argv)
        export_run(run_dir, args.format, args.tier, out, command)
        return 0
    if args.command == "compare":
        from pipeline.eval.compare import compare

        if args.jobs < 1:
            raise UserError(f"--jobs: must be >= 1, got {args.jobs}")
        if args.mode is not None and args.mode not in EVAL_MODES:
            raise UserError(f"--mode: must be choice or generate, got {args.mode!r}")
        command = "fedmoe compare " + " ".join(sys.argv[2:] if argv is None else argv[1:])
        compare(Path(args.spec), Path(args.out), args.jobs, args.overrides, command, args.force, args.report_only,
                args.mode)
        return 0
    if args.command == "plan":
        from pipeline.plan import show_plan

        show_plan(load_config(args.config, args.overrides), args.ranks, args.rounds, args.sbatch,
                  args.config, args.overrides, args.gpus_per_node)
        return 0
    if args.command == "report":
        from pipeline.eval.report import write_report
        from pipeline.federation.rundir import is_run_dir

        run_dir = Path(args.run_dir)
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir}: not a fedmoe run (no config.yaml and metrics.jsonl)")
        print(write_report(run_dir))
        return 0
    raise AssertionError(args.command)


def entry() -> int:
    """The `fedmoe` command (and `python -m pipeline.cli`): `main`, then a frozen heap for the exit.

    The interpreter's final garbage collections walk every object torch and transformers made:
    about 2.4 s of a tiny run's 2.8 s from returning to the process's end (measured). Once `main`
    has returned, everything it wrote is closed and flushed, so the heap is frozen instead and
    those collections skip it; atexit handlers (MPI_Finalize among them) still run."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
