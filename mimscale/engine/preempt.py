"""Preemption: the stop signals a rank acts on, and keeping them away from DataLoader workers.

SIGTERM and SIGUSR1 (what schedulers send before a kill; SLURM's ``--signal=USR1@T``) ask every rank to finish
its step, write one complete checkpoint and exit 75. Schedulers often signal the whole process group, DataLoader
workers included; by default a worker dies on SIGTERM (torch's handler) or SIGUSR1, and the rank then fails with
"DataLoader worker killed" before it can save. Workers are forked inside ``next()`` on the loader, so the rank
blocks these signals around that call: the forked workers inherit the blocked mask and never see them, and the
rank receives any signal that arrived meanwhile as soon as it unblocks.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_WORKER_BLOCKED = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
_received = [0]  # the last stop signal this process received


def install_stop_handlers(on_stop: Callable[[int], None] | None = None, reset: bool = False) -> None:
    """Record SIGTERM/SIGUSR1 instead of dying (and call ``on_stop(signum)``); the loop agrees on it and saves.

    ``reset`` forgets a signal recorded by an earlier run in this process (in-process callers run train() twice).
    """
    if reset:
        _received[0] = 0

    def request_stop(signum, _frame):
        _received[0] = signum
        if on_stop is not None:
            on_stop(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)


def stop_requested() -> int:
    """The stop signal received so far (0 if none), including one that arrived during start-up."""
    return _received[0]


@contextlib.contextmanager
def signals_kept_from_children():
    """Block the stop signals (and SIGINT) in this thread while it may fork DataLoader workers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
