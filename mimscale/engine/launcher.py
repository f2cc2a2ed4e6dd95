"""`mimscale launch ARGS`: DeepSpeed's launcher (`deepspeed ARGS`, the same arguments) made safe to preempt.

Bare `deepspeed` loses work when a scheduler signals it: the runner dies on SIGTERM/SIGUSR1 at once (its ranks
train on, orphaned), and the per-node launcher (deepspeed.launcher.launch) answers SIGTERM by terminating every
rank and killing it 30 s later, then exits 1. Here the runner runs in this process with handlers that forward
SIGTERM/SIGUSR1 to the node launcher, and the node launcher is ours (mimscale.engine.node_launcher: DeepSpeed's,
with the same signals forwarded to the ranks instead of killing them). Whether the signal reaches this process,
the node launcher, the ranks or the whole process group, the ranks finish their step, write one complete
checkpoint and exit 75, and so does this command. The ranks' requeue marker (MIMSCALE_REQUEUE_MARKER, set here to
a private file when the job script did not set one) decides the exit code, whatever the launchers report.

With a hostfile naming several hosts, DeepSpeed's runner would start the nodes through pdsh; here they are started
by mimscale.engine.fanout (one ssh per node with a control channel), which forwards the stop signals to every
node, ends the job when a node fails or dies, and leaves no rank behind (see that module for why pdsh cannot).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from mimscale.engine.fanout import EXIT_REQUEUE, FinishedCommand, NodeFanOut
from mimscale.engine.preempt import STOP_SIGNALS
from mimscale.engine.slurm import REQUEUE_MARKER_ENV

NODE_LAUNCHER = "mimscale.engine.node_launcher"
_DEEPSPEED_NODE_LAUNCHER = re.compile(r"\bdeepspeed\.launcher\.launch\b")


def _node_launcher_subprocess(children: list) -> types.SimpleNamespace:
    """The ``subprocess`` module as DeepSpeed's runner sees it: Popen starts our node launcher instead of its own."""

    def popen(command, *args, **kwargs):
        if isinstance(command, (list, tuple)):
            command = [_DEEPSPEED_NODE_LAUNCHER.sub(NODE_LAUNCHER, str(part)) for part in command]
            if command[:1] == ["pdsh"]:  # the multi-node runner: its start command, or its pkill on a signal
                if any(part.startswith("pkill") for part in command):
                    return FinishedCommand()
                process = NodeFanOut(command, kwargs.get("env") or dict(os.environ))
                children.append(process)
                return process
        process = subprocess.Popen(command, *args, **kwargs)
        children.append(process)
        return process

    namespace = types.SimpleNamespace(**{name: getattr(subprocess, name) for name in dir(subprocess)})
    namespace.Popen = popen
    return namespace


def _pdsh_runner_quoting_every_argument(runner_module) -> type:
    """DeepSpeed's pdsh runner, its training arguments quoted for the nodes' shells.

    The remote command runs through each node's shell, and DeepSpeed quotes an argument only when it holds a space:
    `--set data.shards=/data/train-{000..099}.tar` reached every node as 100 arguments (brace expansion; measured on
    the namespace cluster, tests/test_multinode.py), and `$`, `*`, `;` or quotes would be taken apart as well. Each
    argument is quoted with shlex.quote instead, so every rank on every node gets exactly the arguments given here.
    """

    class QuotingPDSHRunner(runner_module.PDSHRunner):
        def parse_user_args(self):
            return [shlex.quote(arg) for arg in self.args.user_args]

    return QuotingPDSHRunner


def _signal_module_keeping_ours() -> types.SimpleNamespace:
    """``signal`` as DeepSpeed's runner sees it: its multi-node SIGINT/SIGTERM handler (pkill every DeepSpeed job
    on every host, exit 1) is not installed; ours forward the signal to the nodes and wait for their exit codes."""

    def install(signum, handler):
        if signum in (signal.SIGINT, *STOP_SIGNALS):
            return signal.getsignal(signum)
        return signal.signal(signum, handler)

    namespace = types.SimpleNamespace(**{name: getattr(signal, name) for name in dir(signal)})
    namespace.signal = install
    return namespace


def main(argv: list[str]) -> int:
    """Run DeepSpeed's runner with ``argv``; returns 75 when the ranks checkpointed on a stop signal."""
    from deepspeed.launcher import runner

    marker = os.environ.get(REQUEUE_MARKER_ENV)
    private = marker is None
    if private:
        marker = os.path.join(tempfile.mkdtemp(prefix="mimscale-launch-"), "requeue")
        os.environ[REQUEUE_MARKER_ENV] = marker
    children: list[subprocess.Popen] = []
    runner.subprocess = _node_launcher_subprocess(children)
    runner.signal = _signal_module_keeping_ours()
    runner.PDSHRunner = _pdsh_runner_quoting_every_argument(runner)

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    def interrupt(signum, frame):
        if not any(isinstance(child, NodeFanOut) for child in children):
            raise KeyboardInterrupt
        forward(signum, frame)  # the fan-out kills every node's ranks, then the runner returns their codes

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    signal.signal(signal.SIGINT, interrupt)
    try:
        runner.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    if children and children[-1].returncode is not None and children[-1].returncode < 0:
        code = 128 - children[-1].returncode  # the node launcher was killed: say so (the runner reports 0)
    requeue = Path(marker).is_file()
    if private:
        Path(marker).unlink(missing_ok=True)
        os.rmdir(os.path.dirname(marker))
    return EXIT_REQUEUE if requeue else code


if __name__ == "__main__":
    from mimscale.process_exit import exit_quickly

    exit_quickly(main(sys.argv[1:]))
