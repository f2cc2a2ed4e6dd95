"""DeepSpeed's per-node launcher with stop signals forwarded to the ranks instead of killing them.

`mimscale launch` makes DeepSpeed's runner start this module where it would start deepspeed.launcher.launch.
Unchanged: how ranks are spawned, their environment, and that the first rank to fail takes the others down.
Changed: SIGTERM and SIGUSR1 are passed on to the ranks, which checkpoint and exit 75; this process keeps
waiting for them (DeepSpeed's handler would terminate them and kill them 30 s later, then exit 1).
Started by `mimscale launch`'s ssh fan-out (``--mimscale_control=stdin``, mimscale.engine.fanout), it also obeys
its standard input: a stop signal's number is forwarded to the ranks; ``kill``, the end of the input (the runner
or its ssh is gone), or silence for SILENCE_S (the runner writes a heartbeat every HEARTBEAT_S: a network
partition) kills every process under this one and exits 137, so no rank outlives its job.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import types

import psutil

from mimscale.engine.fanout import CONTROL_FLAG, HEARTBEAT_S, KILL_WORD
from mimscale.engine.preempt import STOP_SIGNALS

EXIT_KILLED = 137
SILENCE_S = 6 * HEARTBEAT_S  # no line from the runner for this long: the node is cut off from it


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


def _control_lines(fd: int, silence_s: float):
    """The lines the runner writes on ``fd``; ends at end of input, or when nothing came for ``silence_s``."""
    pending = b""
    while True:
        readable, _, _ = select.select([fd], [], [], silence_s)
        if not readable:
            yield None  # silence: the runner writes a heartbeat every few seconds, so the link is gone
            return
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode(errors="replace").strip()


def obey_runner(fd: int = 0, silence_s: float = SILENCE_S) -> None:
    """Act on the runner's control lines (see the module doc); runs in a daemon thread."""
    for word in _control_lines(fd, silence_s):
        if word is None:
            kill_everything_below_and_exit(f"no word from the runner for {silence_s:.0f} s (node cut off?)")
        elif word.isdigit() and int(word) in STOP_SIGNALS:
            forward_to_ranks(int(word), None)
        elif word == KILL_WORD:
            kill_everything_below_and_exit("the runner stopped the job (another node failed or it was interrupted)")
    kill_everything_below_and_exit("the connection to the runner closed (runner killed or node cut off)")


def main() -> None:
    from deepspeed.launcher import launch

    if CONTROL_FLAG in sys.argv:
        sys.argv.remove(CONTROL_FLAG)
        threading.Thread(target=obey_runner, daemon=True, name="runner-control").start()
    launch.signal = _signal_module_forwarding_stops()
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward_to_ranks)
    launch.main()


if __name__ == "__main__":
    from mimscale.process_exit import exit_quickly

    main()
    exit_quickly(0)
