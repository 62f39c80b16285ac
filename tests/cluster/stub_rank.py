"""Stand-in for a fedmoe rank (`python -m mpi4py -m pipeline.cli run|resume ...`) in the
time-limit test, whose SLURM timings (a 1-minute minimum limit, signals sent on a 30 s tick) a
real rank's tens of seconds of start-up would make slow and uneven: this one starts at once.

It does STUB_UNITS units of one second each, counting them in RUN/progress (rank 0 writes). On
SIGUSR1 or SIGTERM it stops after the current unit with the count kept and exits 0, like a
rank that checkpointed its completed rounds. After the last unit rank 0 writes
RUN/final/adapter.safetensors. Each start and stop is a line in RUN/stub.log."""
import os
import signal
import sys
import time
from pathlib import Path

stop = False


def _on_signal(signum, frame):
    global stop
    stop = True


def main(argv):
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    command, rest = argv[0], argv[1:]
    run = Path(rest[rest.index("--out") + 1] if command == "run" else rest[0])
    writes = os.environ.get("SLURM_PROCID", "0") == "0"
    units = int(os.environ["STUB_UNITS"])
    progress = run / "progress"
    if writes and command == "run":  # what the job script takes for a run to resume
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text("stub\n")
        (run / "metrics.jsonl").write_text("")
    done = int(progress.read_text()) if progress.exists() else 0

    def record(line):
        if writes:
            with open(run / "stub.log", "a") as f:
                f.write(f"{line} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")

    record(f"{command} from={done}")
    while done < units:
        if stop:
            record(f"stopped at={done}")
            return 0
        time.sleep(1)
        done += 1
        if writes:
            progress.with_suffix(".tmp").write_text(str(done))
            progress.with_suffix(".tmp").replace(progress)
    if writes:
        (run / "final").mkdir(exist_ok=True)
        (run / "final" / "adapter.safetensors").write_text("stub\n")
    record(f"finished at={done}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
