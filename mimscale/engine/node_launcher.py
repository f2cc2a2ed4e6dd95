"""DeepSpeed's per-node launcher with stop signals forwarded to the ranks instead of killing them.

`mimscale launch` makes DeepSpeed's runner start this module where it would start deepspeed.launcher.launch.
Unchanged: how ranks are spawned, their environment, and that the first rank to fail takes the others down.
Changed: SIGTERM and SIGUSR1 are passed on to the ranks, which checkpoint and exit 75; this process keeps
waiting for them (DeepSpeed's handler would terminate them and kill them 30 s later, then exit 1).
Started by `mimscale launch`'s ssh fan-out (``--mimscale_control=stdin``, mimscale.engine.fanout), it also obeys
its standard input: a stop signal's number is forwarded to the ranks; ``kill``, or the end of the input (the
runner or its ssh is gone), kills every process under this one and exits 137, so no rank outlives its job.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import types

import psutil

from mimscale.engine.fanout import CONTROL_FLAG, KILL_WORD
from mimscale.engine.preempt import STOP_SIGNALS

EXIT_KILLED = 137


def forward_to_ranks(signum, _frame) -> None:
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _signal_module_forwarding_stops() -> types.SimpleNamespace:
    """``signal`` as DeepSpeed's launch module sees it: its SIGTERM handler is replaced by forward_to_ranks."""

    def install(signum, handler):
        return signal.signal(signum, forward_to_ranks if signum in STOP_SIGNALS else handler)

    namespace = types.SimpleNamespace(**{name: getattr(signal, name) for name in dir(signal)})
    namespace.signal = install
    return namespace


def kill_everything_below_and_exit(reason: str) -> None:
    """SIGKILL every descendant (ranks, their DataLoader workers), then leave at once with 137."""
    print(f"mimscale node launcher on {os.uname().nodename}: {reason}; killing its ranks", file=sys.stderr, flush=True)
    for process in psutil.Process().children(recursive=True):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(EXIT_KILLED)


def obey_runner(stream) -> None:
    """Read the runner's control lines until the input ends (see the module doc); runs in a daemon thread."""
    for line in stream:
        word = line.strip()
        if word.isdigit() and int(word) in STOP_SIGNALS:
            forward_to_ranks(int(word), None)
        elif word == KILL_WORD:
            kill_everything_below_and_exit("the runner stopped the job (another node failed or it was interrupted)")
    kill_everything_below_and_exit("the connection to the runner closed (runner killed or node cut off)")


def main() -> None:
    from deepspeed.launcher import launch

    if CONTROL_FLAG in sys.argv:
        sys.argv.remove(CONTROL_FLAG)
        threading.Thread(target=obey_runner, args=(sys.stdin,), daemon=True, name="runner-control").start()
    launch.signal = _signal_module_forwarding_stops()
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward_to_ranks)
    launch.main()


if __name__ == "__main__":
    main()
