"""SIGUSR1 and SIGTERM both become a stop request instead of killing the process."""
import os
import signal

import pytest

from pipeline.federation import signals


@pytest.mark.parametrize("sig", signals.STOP_SIGNALS)
def test_stop_signals_set_the_flag_and_do_not_kill(sig):
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.clear()
        signals.install()
        assert not signals.requested()
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill returns here
        assert signals.requested()
        assert signals.any_stopped(None, timeout=1.0)  # one process: its own flag decides
    finally:
        signals.clear()
        for s, handler in saved.items():
            signal.signal(s, handler)
