"""The multi-node step of `mimscale launch`: one ssh per node, in place of DeepSpeed's pdsh.

DeepSpeed's runner builds a pdsh command that starts the node launcher on every host over ssh. pdsh cannot carry
what a preemptible job needs (measured on the namespace cluster, tests/test_multinode.py): a signal to it kills
the local ssh clients and leaves the remote ranks training without a checkpoint (DeepSpeed then pkills every
DeepSpeed job on each host and exits 1); and it returns only when every host has finished, so when one node fails
to start or dies the others wait in the rendezvous or the next collective until their timeouts (15 min here).

``NodeFanOut`` runs the same remote command, node by node, with the same ssh options (``PDSH_SSH_ARGS_APPEND``,
``%n`` replaced by the node's rank as pdsh does), and keeps each ssh's stdin as a control channel to the node
launcher (mimscale.engine.node_launcher ``--mimscale_control=stdin``):

- a stop signal (SIGTERM/SIGUSR1) to the runner is written to every node; every rank checkpoints once and exits
  75, and so does the job (the largest-code rule of ``pdsh -S`` is replaced by: a failure wins, else 75, else 0);
- when a node exits with a failure, the others get ``FAIL_GRACE_S`` to stop on their own (their ranks see the
  broken collective and say which peer went away), then their ranks are killed; the job exits with the first
  failing node's code, naming it;
- when the control channel closes (this runner killed, its ssh killed) or falls silent (a line is written every
  ``HEARTBEAT_S``; silence means a network partition) the node launcher kills its ranks: no rank outlives the job
  on any node; on this side ssh's keep-alive (``SSH_KEEPALIVE``) ends a cut-off node's ssh within 30 s, which
  counts as that node failing.

The ssh clients run in their own sessions, so a signal to the runner's process group (what schedulers send)
reaches the ranks once, through the runner, and they die with the runner (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import shlex
import signal
import subprocess
import sys
import time

from mimscale.engine.preempt import STOP_SIGNALS

EXIT_REQUEUE = 75  # the ranks checkpointed on a stop signal (mimscale.engine.loop's code)
FAIL_GRACE_S = 10.0
CONTROL_FLAG = "--mimscale_control=stdin"
NODE_LAUNCHER = "mimscale.engine.node_launcher"
KILL_WORD = "kill"
HEARTBEAT_S = 5.0  # the runner writes a line this often; a node launcher that hears nothing for 6x that stops
SSH_KEEPALIVE = ["-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"]  # a cut-off node: ssh exits in 30 s


def _die_with_parent() -> None:
    """In the ssh child: receive SIGTERM when the runner dies (Linux), so the node launchers see their input end."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def split_pdsh_command(command: list[str]) -> tuple[list[str], list[str]]:
    """``(hosts, remote command parts)`` of the ``pdsh -S -f N -w h1,h2 PARTS...`` DeepSpeed's PDSHRunner builds."""
    if command[:2] != ["pdsh", "-S"] or command[2] != "-f" or command[4] != "-w":
        raise ValueError(f"unexpected pdsh command from DeepSpeed's runner: {' '.join(command[:8])}")
    parts = command[6:]
    if not parts or not parts[0].startswith(("export ", "source ", "cd ")):  # how DeepSpeed's remote part begins
        raise ValueError(
            "mimscale launch starts the nodes with ssh itself, so --launcher_args (pdsh options) cannot be used; "
            "put ssh options in PDSH_SSH_ARGS_APPEND or ~/.ssh/config"
        )
    if NODE_LAUNCHER not in parts:
        raise ValueError(f"DeepSpeed's remote command does not start {NODE_LAUNCHER}: {' '.join(parts)[:300]}")
    return command[5].split(","), parts


def combine_exit_codes(codes: list[int]) -> int:
    """The job's exit code from the nodes': the first failure, else 75 when any node checkpointed on a signal."""
    failures = [code for code in codes if code not in (0, EXIT_REQUEUE)]
    if failures:
        return failures[0]
    return EXIT_REQUEUE if EXIT_REQUEUE in codes else 0


class NodeFanOut:
    """Popen-like (wait, poll, send_signal, returncode) stand-in for DeepSpeed's pdsh child; see the module doc."""

    def __init__(self, pdsh_command: list[str], env: dict[str, str]) -> None:
        self.hosts, parts = split_pdsh_command(pdsh_command)
        at = parts.index(NODE_LAUNCHER) + 1
        parts = [*parts[:at], CONTROL_FLAG, *parts[at:]]
        remote = " ".join(parts)
        ssh_options = shlex.split(env.get("PDSH_SSH_ARGS_APPEND", ""))
        self.nodes: list[subprocess.Popen] = []
        for rank, host in enumerate(self.hosts):
            command = ["ssh", "-a", "-x", *ssh_options, *SSH_KEEPALIVE, host, remote.replace("%n", str(rank))]
            self.nodes.append(
                subprocess.Popen(
                    command, env=env, stdin=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent
                )  # fmt: skip
            )
        self.finished: list[tuple[int, int]] = []  # (node rank, exit code) in the order they ended
        self.returncode: int | None = None
        self._killing_at: float | None = None
        self._heartbeat_at = time.monotonic() + HEARTBEAT_S

    def _tell(self, word: str, nodes: list[int] | None = None) -> None:
        for rank in range(len(self.nodes)) if nodes is None else nodes:
            node = self.nodes[rank]
            if node.poll() is None and node.stdin is not None:
                try:
                    node.stdin.write(f"{word}\n".encode())
                    node.stdin.flush()
                except OSError:  # that node's ssh is gone: it is reported when it is reaped
                    pass

    def send_signal(self, signum: int) -> None:
        """A stop signal goes to every node's ranks (they checkpoint); any other signal kills every node's ranks."""
        self._tell(str(int(signum)) if signum in STOP_SIGNALS else KILL_WORD)

    def _reap(self) -> None:
        done = {rank for rank, _ in self.finished}
        for rank, node in enumerate(self.nodes):
            if rank not in done and node.poll() is not None:
                self.finished.append((rank, node.returncode))
                if node.returncode not in (0, EXIT_REQUEUE) and self._killing_at is None:
                    self._report_failure(rank, node.returncode)

    def _report_failure(self, rank: int, code: int) -> None:
        why = " (ssh: connection lost, or the node's processes were killed)" if code == 255 else ""
        print(
            f"mimscale launch: node rank {rank} ({self.hosts[rank]}) exited with code {code}{why}; stopping the other "
            f"nodes (their ranks are killed if they have not stopped within {FAIL_GRACE_S:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        self._killing_at = time.monotonic() + FAIL_GRACE_S

    def poll(self) -> int | None:
        self._reap()
        if time.monotonic() >= self._heartbeat_at:
            self._tell("alive")
            self._heartbeat_at = time.monotonic() + HEARTBEAT_S
        if self._killing_at is not None and time.monotonic() >= self._killing_at:
            self._tell(KILL_WORD)
            self._killing_at = float("inf")  # told once
        if len(self.finished) == len(self.nodes) and self.returncode is None:
            self.returncode = combine_exit_codes([code for _, code in self.finished])
            for node in self.nodes:
                if node.stdin is not None:
                    node.stdin.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ssh fan-out", timeout)
            time.sleep(0.2)
        return self.returncode


class FinishedCommand:
    """DeepSpeed's ``pkill -f`` kill command, not run: it matches every DeepSpeed job on the hosts (DS #6807)."""

    returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0
