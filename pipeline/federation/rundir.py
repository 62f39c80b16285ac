"""A run directory has one writer, and `--out` is checked before anything is written.

`run` and `resume` (and so `compare`'s child runs) hold an exclusive `fcntl.flock` on RUN/.lock
while they run. The kernel drops it when the process ends, however it ends, so a killed run
never leaves a stale lock; a second writer is refused with one line (exit 2). Under MPI only
world rank 0 writes files, so only it holds the lock, and it tells the other ranks when it was
refused (`on_writer`), so that none waits in a collective for a rank that gave up.

`--overwrite` moves the old run aside (`.NAME.replaced-PID`, next to it) instead of deleting
it; `Start.started`, called once the new run's round-0 checkpoint is on disk, deletes it, and a
start that fails before that point removes the new directory and moves the old run back (a
start killed by SIGKILL in that window leaves the old run there, for the user to move back).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from pipeline.errors import UserError

LOCK_FILE = ".lock"
LAUNCH_LOGS = "logs"  # RUN/logs/: written by launchers (slurm/) from before the run exists


class RunLock:
    """An exclusive flock on RUN/.lock; `release` (or the end of the process) drops it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{run_dir}: cannot create {LOCK_FILE}: {exc.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"{run_dir}: another fedmoe process is writing this run (it holds "
                            f"{self.path}); wait for it to end or stop it") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def on_writer(topology, action):
    """`action()` on world rank 0 only; a UserError it raises is raised on every rank."""
    result, error = None, None
    if topology is None or topology.writes:
        try:
            result = action()
        except UserError as exc:
            error = str(exc)
    if topology is not None and topology.distributed:
        error = topology.world.bcast(error, root=0)
    if error is not None:
        raise UserError(error)
    return result


def check_out(out: Path) -> None:
    """`--out` can be a run directory this process may create or write into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):  # EROFS as well as permissions
        raise UserError(f"--out {out}: cannot write in {existing} (read-only or no permission)")


class Start:
    """Claims `out` for a new run (rank 0 only): locks it, moves an old run aside, creates it."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite
        self.lock: RunLock | None = None
        self.aside: Path | None = None
        self.created = False
        self.claimed = self.is_started = False

    def occupied(self) -> bool:
        return self.out.exists() and any(p.name not in (LAUNCH_LOGS, LOCK_FILE) for p in self.out.iterdir())

    def check(self) -> None:
        """Before anything is loaded: refuse what no input can fix, lock an existing `out`."""
        check_out(self.out)
        if self.occupied() and not self.overwrite:
            raise UserError(f"{self.out}: directory exists and is not empty (pass --overwrite to replace it)")
        if self.occupied() and not (self.out / "config.yaml").is_file():
            raise UserError(f"{self.out}: not a fedmoe run directory; refusing to overwrite it")
        if self.out.is_dir():
            self.lock = RunLock(self.out)

    def claim(self) -> None:
        """After every input was checked: the old run aside, the new directory locked."""
        if self.lock is None:  # a new directory: mkdir is the atomic claim against a racing start
            try:
                self.out.mkdir(parents=True)
            except FileExistsError:
                raise UserError(f"{self.out}: created by another process while this run started") from None
            self.created = self.claimed = True
            self.lock = RunLock(self.out)
            return
        if not self.occupied():
            self.claimed = True
            return
        if not self.overwrite:  # a run appeared in it since `check` (written without the lock)
            raise UserError(f"{self.out}: directory exists and is not empty (pass --overwrite to replace it)")
        self.aside = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")
        old_lock = self.lock
        self.out.rename(self.aside)
        self.claimed = True
        self.out.mkdir()
        self.created = True
        self.lock = RunLock(self.out)
        old_lock.release()
        logs = self.aside / LAUNCH_LOGS
        if logs.is_dir():  # the launcher's log of this very job may be among them
            logs.rename(self.out / LAUNCH_LOGS)

    def started(self) -> None:
        """The new run's round 0 is on disk: the old run can go."""
        self.is_started = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def failed(self) -> None:
        """The start failed before round 0 was saved: leave `out` as it was found."""
        if self.is_started or not self.claimed:
            return
        if self.created and self.aside is None:
            shutil.rmtree(self.out, ignore_errors=True)
        elif self.aside is None:  # a directory that held only launcher logs: remove what we wrote
            for path in self.out.iterdir():
                if path.is_dir() and path.name != LAUNCH_LOGS:
                    shutil.rmtree(path)
                elif path.name not in (LAUNCH_LOGS, LOCK_FILE):
                    path.unlink()
        else:
            if self.created:
                logs = self.out / LAUNCH_LOGS
                if logs.is_dir():
                    logs.rename(self.aside / LAUNCH_LOGS)
                shutil.rmtree(self.out, ignore_errors=True)
            if not self.out.exists():
                self.aside.rename(self.out)
                self.aside = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").exists()


def run_config(run_dir: Path):
    """The config of an existing run directory (UserError when it is not one)."""
    from pipeline.config import load_config

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a fedmoe run (no config.yaml and metrics.jsonl)")
    return load_config(run_dir / "config.yaml")
