"""DeepSpeed's per-node launcher with stop signals forwarded to the ranks instead of killing them.

`mimscale launch` makes DeepSpeed's runner start this module where it would start deepspeed.launcher.launch.
Unchanged: how ranks are spawned, their environment, and that the first rank to fail takes the others down.
Changed: SIGTERM and SIGUSR1 are passed on to the ranks, which checkpoint and exit 75; this process keeps
waiting for them (DeepSpeed's handler would terminate them and kill them 30 s later, then exit 1).
"""

from __future__ import annotations

import signal
import types

import psutil

from mimscale.engine.preempt import STOP_SIGNALS


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


def main() -> None:
    from deepspeed.launcher import launch

    launch.signal = _signal_module_forwarding_stops()
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward_to_ranks)
    launch.main()


if __name__ == "__main__":
    main()
