import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_run.yaml"


def fedmoe(*args, check=True, threads=1, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it (one thread unless told: tests share 2 cores)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedmoe {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def fails_one_line(capsys, argv, needle):
    """`fedmoe ARGV` in this process exits 2 with one `fedmoe: error:` line holding `needle`."""
    from pipeline.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("fedmoe: error: "), err
    assert needle in err, err


@pytest.fixture
def cli(capfd):
    """`cli(*args, threads=1, check=True)`: the CLI's `main` in this process, at `threads` threads as
    `fedmoe` runs it: (exit code, stdout, stderr), both captured at the file descriptors. For
    commands that do not train (eval, bad input), and for runs a test only reads: a second
    interpreter spends ~10 s of a core importing torch, transformers and DeepSpeed. Kill and
    signal tests keep their own process."""
    from pipeline.cli import main
    from tests.conftest import as_fedmoe_process

    def call(*args, threads=1, check=True):
        capfd.readouterr()
        with as_fedmoe_process(threads):
            code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"fedmoe {' '.join(map(str, args))} exited {code}\n{err[-3000:]}")
        return code, out, err

    return call


@pytest.fixture(scope="session")
def finished_run(tiny_reference) -> Path:
    """One uninterrupted tiny run shared by the tests that only read its outputs."""
    return tiny_reference


@pytest.fixture(scope="session")
def two_thread_run(tmp_path_factory) -> Path:
    """The tiny run at two threads, where order-dependent float kernels would show."""
    from tests.conftest import run_here, shared_run

    return shared_run(tmp_path_factory, "two-threads", lambda out: run_here("run", "--config", TINY, "--out", out,
                                                                            threads=2))
