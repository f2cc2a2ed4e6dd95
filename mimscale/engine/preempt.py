"""Stop signals: what a rank does on SIGTERM/SIGUSR1/SIGINT, at any moment, and keeping them from DataLoader workers.

The rule (README, "Signals"):

- SIGTERM and SIGUSR1 (what schedulers send before a kill; SLURM's ``--signal=USR1@T``) ask every rank to finish
  its step, write one complete checkpoint and exit 75 (EX_TEMPFAIL: requeue me).
- SIGINT (Ctrl-C) does the same and exits 130; a second SIGINT exits 130 at once, without a checkpoint.
- During start-up (before the process group exists) there is nothing to save yet: the rank exits 75 (130 for
  Ctrl-C) at the next start-up check. The handlers are installed first thing (``mimscale.cli``), before the slow
  imports, so a signal in the first seconds never kills the process with 143.
- A rank that does not reach a step boundary within ``run.stop_timeout_s`` of the signal (wedged in a collective,
  a stuck read, a hang) prints every thread's Python stack and exits 124. Python runs signal handlers only between
  bytecodes of the main thread, so this deadline (and the second Ctrl-C) is kept by a watchdog thread that learns
  of each signal through ``signal.set_wakeup_fd``, which the interpreter writes from the C-level handler.

Schedulers often signal the whole process group, DataLoader workers included; by default a worker dies on SIGTERM
(torch's handler) or SIGUSR1, and the rank then fails with "DataLoader worker killed" before it can save. Workers
are forked inside ``next()`` on the loader, so the rank blocks these signals around that call: the forked workers
inherit the blocked mask and never see them, and the rank receives any signal that arrived meanwhile as soon as it
unblocks.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the launchers forward these to the ranks
INTERRUPT = signal.SIGINT  # Ctrl-C: reaches every process of the terminal's group by itself, never forwarded
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 (after checkpointing, or during start-up)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C
EXIT_STOP_TIMEOUT = 124  # a stop signal was not acted on within run.stop_timeout_s (the stack is printed)
DEFAULT_STOP_TIMEOUT_S = 300.0
_WORKER_BLOCKED = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
_received = [0]  # the stop signal this process acts on (SIGTERM/SIGUSR1 win over SIGINT)
_interrupts = [0]  # SIGINTs received: the second one exits at once
_on_stop: list[Callable[[int], None] | None] = [None]
_stop_timeout_s = [DEFAULT_STOP_TIMEOUT_S]
_acknowledged = threading.Event()  # the loop acted on the stop: the deadline no longer applies
_watchdog: list[threading.Thread | None] = [None]


def exit_code_for(signum: int) -> int:
    return EXIT_INTERRUPTED if signum == INTERRUPT else EXIT_REQUEUE


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _exit_on_second_interrupt() -> None:
    print(f"mimscale: rank {_rank()}: second Ctrl-C: exiting now without a checkpoint", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def _request_stop(signum: int, _frame) -> None:
    if signum == INTERRUPT:
        _interrupts[0] += 1
        if _interrupts[0] >= 2:
            _exit_on_second_interrupt()
        if _received[0]:  # a scheduler's stop already asked for a requeue; Ctrl-C does not cancel that
            return
    _received[0] = signum
    if _on_stop[0] is not None:
        _on_stop[0](signum)


def install_stop_handlers(on_stop: Callable[[int], None] | None = None, reset: bool = False) -> None:
    """Record SIGTERM/SIGUSR1/SIGINT instead of dying (and call ``on_stop(signum)``); start the deadline watchdog.

    Call it first thing in the main thread (``mimscale.cli`` does, for ``train``); calling it again only changes
    ``on_stop``. ``reset`` forgets a signal recorded earlier in this process (see ``forget_stop``).
    """
    if reset:
        forget_stop()
    _on_stop[0] = on_stop
    for signum in (*STOP_SIGNALS, INTERRUPT):
        signal.signal(signum, _request_stop)
    if _watchdog[0] is None and threading.current_thread() is threading.main_thread():
        _start_watchdog()


def forget_stop() -> None:
    """Forget a recorded stop (in-process callers run train() more than once)."""
    _received[0] = _interrupts[0] = 0
    _acknowledged.clear()


def set_stop_timeout(seconds: float) -> None:
    """run.stop_timeout_s, once the config is loaded (the default applies to signals before that)."""
    _stop_timeout_s[0] = float(seconds)


def acknowledge_stop() -> None:
    """This rank finished a step after the signal (it is not wedged; a stalled peer is the collective timeout's
    to name): the stop deadline no longer applies."""
    _acknowledged.set()


def stop_requested() -> int:
    """The stop signal received so far (0 if none), including one that arrived during start-up."""
    return _received[0]


def exit_if_stopped_during_startup(where: str) -> int | None:
    """The exit code if a stop signal arrived before training began (nothing to save yet), else None."""
    signum = stop_requested()
    if not signum:
        return None
    acknowledge_stop()
    print(
        f"mimscale: rank {_rank()}: stopped by signal {signum} during start-up ({where}), before any step: nothing "
        f"to save; exiting {exit_code_for(signum)}" + (" (requeue me)" if signum != INTERRUPT else ""),
        file=sys.stderr,
        flush=True,
    )
    return exit_code_for(signum)


def _start_watchdog() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=lambda: _forget_wakeup_fd(read_fd, write_fd))
    thread = threading.Thread(target=_watch, args=(read_fd,), name="mimscale-stop-watchdog", daemon=True)
    thread.start()
    _watchdog[0] = thread


def _forget_wakeup_fd(read_fd: int, write_fd: int) -> None:
    """In a forked child (a DataLoader worker): its signals are its own, never reported to the rank's watchdog."""
    with contextlib.suppress(ValueError, OSError):
        if signal.set_wakeup_fd(-1) == write_fd:
            os.close(read_fd)
            os.close(write_fd)


def _watch(read_fd: int) -> None:
    """Learn of every signal from the wakeup pipe; exit at a second Ctrl-C, or when a stop outlives its deadline."""
    deadline = None
    interrupts = 0
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([read_fd], [], [], timeout)[0]:
            if not _acknowledged.is_set():
                _stop_timed_out()
            deadline = None
            continue
        for signum in os.read(read_fd, 512):
            if signum == INTERRUPT:
                interrupts += 1
                if interrupts >= 2:
                    _exit_on_second_interrupt()
            if signum in (*STOP_SIGNALS, INTERRUPT) and deadline is None and not _acknowledged.is_set():
                deadline = time.monotonic() + _stop_timeout_s[0]


def _stop_timed_out() -> None:
    print(
        f"mimscale: rank {_rank()}: a stop signal ({stop_requested() or '?'}) arrived {_stop_timeout_s[0]:g} s ago "
        f"and this rank has not reached a step boundary to act on it (run.stop_timeout_s={_stop_timeout_s[0]:g}); "
        f"it is stuck where the stacks below show. Exiting {EXIT_STOP_TIMEOUT} without a checkpoint; the previous "
        "one is intact",
        file=sys.stderr,
        flush=True,
    )
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr replaced by an object without a file descriptor
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STOP_TIMEOUT)


@contextlib.contextmanager
def signals_kept_from_children():
    """Block the stop signals (and SIGINT) in this thread while it may fork DataLoader workers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
