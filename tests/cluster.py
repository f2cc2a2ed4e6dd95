"""A cluster of N hosts on one Linux machine, made from namespaces, for multi-node launches without mocks.

Each node is a network namespace with a veth into one bridge and its own address on a private test subnet
(10.213.7.0/24 unless told otherwise; no address is added outside the namespaces made here), plus its own UTS
(hostname), PID (process list; DeepSpeed's `pkill -f` on "each host" stays on that host) and mount namespace.
The first process of a node (PID 1 there) is this module's ``node-init``: it mounts the node-local disk (a
folder of its own bound onto one shared mount point, ``<state>/node-local``, so the same path names a different
disk on every node, as a cluster's local scratch does), binds the cluster's ssh client configuration over
/etc/ssh/ssh_config (``ssh <node address>`` works from every node with the cluster's key, the machine's own
~/.ssh is untouched), starts an sshd on the node's address only and reaps orphans until sshd exits. The
repository, run folders and checkpoints stay on the shared filesystem.

With ``storage=True`` the bridge also carries a storage host (``<subnet>.250``): a network namespace of its own that
runs nothing but the file servers ``serve()`` starts (tests/http_serve.py, which logs every request with the
client's address), as a cluster's object store or web server would serve shards to its nodes.

Teardown kills each node's init by pid (which ends every process of that PID namespace, sshd included), deletes
the namespaces (their veths go with them), the bridge and the state folder; it is safe to call twice and after a
half-built ``up``. Used by the ``cluster`` fixture (tests/conftest.py) and by ``launch/local_cluster.sh up|down``.

    python tests/cluster.py up [N] [--name NAME] [--subnet 10.213.7] [--storage]  # prints the hostfile and use
    python tests/cluster.py exec NODE -- COMMAND...                    # run COMMAND on node NODE (1-based)
    python tests/cluster.py down [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE_ROOT = Path("/tmp")
SSHD = "/usr/sbin/sshd"
SSH_CONFIG = "/etc/ssh/ssh_config"
STORAGE_HOST = 250  # the storage host's last address byte
HTTP_SERVE = Path(__file__).resolve().parent / "http_serve.py"


def unavailable_reason() -> str | None:
    """Why this machine cannot stand a namespace cluster up (None when it can)."""
    if os.geteuid() != 0:
        return "the namespace cluster needs root (ip netns, unshare, mount); run the multi-node tests as root"
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "pdsh"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install -y pdsh openssh-server iproute2 util-linux)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (apt-get install -y openssh-server)"
    return None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def _quiet(*command: str) -> None:
    subprocess.run(command, capture_output=True, text=True)


@dataclass
class Cluster:
    """N namespace nodes; ``up()`` builds them, ``down()`` removes every trace."""

    nodes: int = 2
    name: str = "msc"
    subnet: str = "10.213.7"
    init_pids: list[int] = field(default_factory=list)
    storage: bool = False  # also a storage host on the bridge, serving files over HTTP (serve())

    @property
    def state(self) -> Path:
        return STATE_ROOT / f"mimscale-cluster-{self.name}"

    @property
    def node_local(self) -> Path:
        """The one path that is a different, node-local disk on every node (set data.cache_dir under it)."""
        return self.state / "node-local"

    def netns(self, node: int) -> str:
        return f"{self.name}{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node}"

    def hostname(self, node: int) -> str:
        return f"{self.name}-node{node}"

    def disk(self, node: int) -> Path:
        """Node ``node``'s node-local disk as seen from the machine (mounted at ``node_local`` on that node)."""
        return self.state / f"node{node}" / "disk"

    @property
    def bridge(self) -> str:
        return f"{self.name}br"

    @property
    def storage_netns(self) -> str:
        return f"{self.name}s"

    @property
    def storage_address(self) -> str:
        return f"{self.subnet}.{STORAGE_HOST}"

    def hostfile(self, slots: int = 1, nodes: int | None = None) -> Path:
        path = self.state / f"hostfile-{nodes or self.nodes}x{slots}"
        path.write_text("".join(f"{self.address(n)} slots={slots}\n" for n in range(1, (nodes or self.nodes) + 1)))
        return path

    # ---- building -------------------------------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> Cluster:
        """Build the bridge, the nodes and their sshds; on any failure remove what was built and raise."""
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        if self.state.exists() or Path(f"/run/netns/{self.netns(1)}").exists():
            raise RuntimeError(f"a cluster named {self.name!r} exists already: tear it down first (down --name)")
        try:
            self._write_keys_and_configs()
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for node in range(1, self.nodes + 1):
                self._add_node(node)
            if self.storage:
                self._add_host(self.storage_netns, f"{self.name}vs", self.storage_address)
            self._save()
            for node in range(1, self.nodes + 1):
                self._wait_for_sshd(node, timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _write_keys_and_configs(self) -> None:
        self.state.mkdir(mode=0o700)
        self.node_local.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mimscale-cluster", "-f", str(self.state / "id"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mimscale-host", "-f", str(self.state / "host"))
        shutil.copy(self.state / "id.pub", self.state / "authorized_keys")
        (self.state / "ssh_config").write_text(
            f"Host {self.subnet}.*\n"
            f"    IdentityFile {self.state / 'id'}\n"
            "    IdentitiesOnly yes\n"
            "    User root\n"
            "    BatchMode yes\n"
            "    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n"
            "    ConnectTimeout 10\n"
            "    ServerAliveInterval 5\n"
            "    ServerAliveCountMax 3\n"
        )
        for node in range(1, self.nodes + 1):
            self.disk(node).mkdir(parents=True)
            (self.state / f"node{node}" / "sshd_config").write_text(
                f"ListenAddress {self.address(node)}\n"
                f"HostKey {self.state / 'host'}\n"
                f"AuthorizedKeysFile {self.state / 'authorized_keys'}\n"
                f"PidFile {self.state / f'node{node}' / 'sshd.pid'}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PrintMotd no\n"
                "MaxStartups 100\n"
                "MaxSessions 100\n"
            )

    def _add_host(self, netns: str, veth: str, address: str) -> None:
        """A network namespace with a veth (eth0 inside) into the bridge and ``address`` on it."""
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")

    def _add_node(self, node: int) -> None:
        netns = self.netns(node)
        self._add_host(netns, f"{self.name}v{node}", self.address(node))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        log = open(self.state / f"node{node}" / "init.log", "w")  # noqa: SIM115 - the child keeps it
        unshare = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--uts", "--pid", "--mount", "--fork", "--mount-proc",
             sys.executable, str(Path(__file__).resolve()), "node-init", str(node),
             "--name", self.name, "--subnet", self.subnet, "--nodes", str(self.nodes)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.init_pids.append(self._child_of(unshare))

    @staticmethod
    def _child_of(process: subprocess.Popen, timeout: float = 20.0) -> int:
        """The pid (as the machine sees it) of the process ``unshare --fork`` started: PID 1 of the node."""
        import psutil

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = psutil.Process(process.pid).children()
            if children:
                return children[0].pid
            if process.poll() is not None:
                raise RuntimeError(f"a node's unshare exited with {process.returncode}")
            time.sleep(0.05)
        raise RuntimeError("a node's init did not start")

    def _wait_for_sshd(self, node: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = self.exec(1, ["ssh", self.address(node), "hostname"], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and probe.stdout.strip() == self.hostname(node):
                return
            time.sleep(0.2)
        log = (self.state / f"node{node}" / "init.log").read_text()[-2000:]
        raise RuntimeError(f"node {node}'s sshd did not answer within {timeout:.0f} s: {probe.stderr}\n{log}")

    def _save(self) -> None:
        info = {"nodes": self.nodes, "name": self.name, "subnet": self.subnet, "init_pids": self.init_pids,
                "storage": self.storage}  # fmt: skip
        (self.state / "cluster.json").write_text(json.dumps(info))

    @classmethod
    def load(cls, name: str) -> Cluster:
        info = json.loads((STATE_ROOT / f"mimscale-cluster-{name}" / "cluster.json").read_text())
        return cls(**info)

    # ---- using ----------------------------------------------------------------------------------------------
    def enter(self, node: int, command: list[str], cwd: Path | str | None = None) -> list[str]:
        """``command`` as run on ``node``: inside its network, hostname, process and mount namespaces."""
        where = [f"--wd={cwd}"] if cwd else []
        return ["nsenter", "-t", str(self.init_pids[node - 1]), "-n", "-u", "-p", "-m", *where, "--", *command]

    def exec(self, node: int, command: list[str], cwd=None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.enter(node, command, cwd or os.getcwd()), **kwargs)

    def popen(self, node: int, command: list[str], cwd=None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.enter(node, command, cwd or os.getcwd()), **kwargs)

    def processes(self, node: int) -> list:
        """Every process of ``node`` (psutil, the machine's pids), its init and sshd included."""
        import psutil

        wanted = os.readlink(f"/proc/{self.init_pids[node - 1]}/ns/pid")
        found = []
        for process in psutil.process_iter():
            try:
                if os.readlink(f"/proc/{process.pid}/ns/pid") == wanted:
                    found.append(process)
            except OSError:
                continue
        return found

    def processes_mentioning(self, node: int, text: str) -> list:
        """The live (not zombie) processes of ``node`` whose command line contains ``text`` (e.g. a run folder)."""
        import psutil

        found = []
        for process in self.processes(node):
            try:
                if process.status() != psutil.STATUS_ZOMBIE and text in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def alive_mentioning(self, *texts: str) -> dict[int, list[str]]:
        """{node: command lines (cut to 120 characters)} of the live processes mentioning any of ``texts``, for the
        nodes that have some: what a run left behind."""
        found = {}
        for node in range(1, self.nodes + 1):
            alive = [" ".join(p.cmdline())[:120] for text in texts for p in self.processes_mentioning(node, text)]
            if alive:
                found[node] = alive
        return found

    def kill_mentioning(self, text: str) -> int:
        """SIGKILL every process of every node whose command line contains ``text``; how many there were."""
        victims = [p for node in range(1, self.nodes + 1) for p in self.processes_mentioning(node, text)]
        for process in victims:
            try:
                process.kill()
            except Exception:  # noqa: BLE001 - gone already
                pass
        return len(victims)

    def serve(self, folder: Path | str, port: int = 8000) -> FileServer:
        """Serve ``folder`` over HTTP from the storage host (``storage=True``); stop it with ``stop()`` or ``with``
        (``down()`` stops any left running)."""
        if not self.storage:
            raise RuntimeError("this cluster has no storage host: build it with Cluster(..., storage=True)")
        return FileServer(self, Path(folder), port)

    # ---- removing -------------------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill every node (its init takes its whole PID namespace along) and the storage host's servers, delete
        namespaces, bridge and state."""
        for pid in [*self.init_pids, *FileServer.running_in(self)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for netns in [*(self.netns(node) for node in range(1, self.nodes + 1)), self.storage_netns]:
            _quiet("ip", "netns", "del", netns)
        _quiet("ip", "link", "del", self.bridge)
        shutil.rmtree(self.state, ignore_errors=True)
        self.init_pids = []


class FileServer:
    """tests/http_serve.py serving a folder on the storage host's address; ``requests()`` reads its request log."""

    def __init__(self, cluster: Cluster, folder: Path, port: int, timeout: float = 60.0) -> None:
        self.cluster, self.port = cluster, port
        self.log = cluster.state / f"storage-{port}.log"
        command = ["ip", "netns", "exec", cluster.storage_netns, sys.executable, str(HTTP_SERVE), str(folder),
                   "--bind", cluster.storage_address, "--port", str(port), "--request-log", str(self.log)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (cluster.state / f"storage-{port}.pid").write_text(str(self.process.pid))
        first = self.process.stdout.readline()  # "serving ... at URL" once it listens, or why it could not
        if not first.startswith("serving"):
            self.stop()
            raise RuntimeError(f"the storage host's server did not start: {first}{self.process.stdout.read()[-2000:]}")

    @staticmethod
    def running_in(cluster: Cluster) -> list[int]:
        return [int(path.read_text()) for path in cluster.state.glob("storage-*.pid")]

    def url(self, name: str = "") -> str:
        return f"http://{self.cluster.storage_address}:{self.port}/{name}"

    def requests(self) -> list[tuple[str, str, str]]:
        """(client address, method, file name) of every request answered so far, in order."""
        if not self.log.is_file():
            return []
        return [tuple(line.split(" ", 2)) for line in self.log.read_text().splitlines() if line.count(" ") >= 2]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        (self.cluster.state / f"storage-{self.port}.pid").unlink(missing_ok=True)

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def remove_stale_clusters() -> None:
    """Tear down the clusters of test sessions that died without teardown (named mt<pid> after their pytest)."""
    for state in STATE_ROOT.glob("mimscale-cluster-mt*"):
        owner = state.name.removeprefix("mimscale-cluster-mt")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            try:
                Cluster.load(f"mt{owner}").down()
            except (OSError, ValueError):
                Cluster(name=f"mt{owner}").down()


def node_init(cluster: Cluster, node: int) -> int:
    """PID 1 of a node: hostname, node-local disk, ssh client config, sshd; reap orphans until sshd ends."""
    socket.sethostname(cluster.hostname(node))
    _run("mount", "--make-rprivate", "/")
    _run("mount", "--bind", str(cluster.disk(node)), str(cluster.node_local))
    _run("mount", "--bind", str(cluster.state / "ssh_config"), SSH_CONFIG)
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cluster.state / f"node{node}" / "sshd_config")])
    signal.signal(signal.SIGTERM, lambda *_: sshd.terminate())
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == sshd.pid:
            return os.waitstatus_to_exitcode(status)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "exec", "node-init"])
    parser.add_argument("node", nargs="?", type=int, help="up: number of nodes (2); exec/node-init: node number")
    parser.add_argument("--name", default="msc", help="names the namespaces, the bridge and the state folder")
    parser.add_argument("--subnet", default="10.213.7", help="first three octets of the nodes' /24")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--storage", action="store_true", help="up: add a storage host (<subnet>.250) on the bridge")
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.action == "node-init":
        return node_init(Cluster(nodes=args.nodes, name=args.name, subnet=args.subnet), args.node)
    if args.action == "up":
        cluster = Cluster(nodes=args.node or 2, name=args.name, subnet=args.subnet, storage=args.storage).up()
        print(f"{cluster.nodes} nodes up: {', '.join(cluster.address(n) for n in range(1, cluster.nodes + 1))}")
        print(f"hostfile (1 rank per node): {cluster.hostfile()}")
        print(f"node-local disk on every node: {cluster.node_local}")
        if cluster.storage:
            print(f"storage host: {cluster.storage_address} (serve a folder: ip netns exec {cluster.storage_netns} "
                  f"python tests/http_serve.py FOLDER --bind {cluster.storage_address})")  # fmt: skip
        print(
            f"run on node 1: python tests/cluster.py exec 1 --name {cluster.name} -- COMMAND (or launch/local_cluster.sh exec 1 -- COMMAND)"
        )
        return 0
    if not (STATE_ROOT / f"mimscale-cluster-{args.name}" / "cluster.json").is_file():
        if args.action == "down":  # a half-built cluster: remove what may be there
            Cluster(nodes=args.nodes, name=args.name, subnet=args.subnet).down()
            return 0
        print(f"no cluster named {args.name!r} is up (start one with: up)", file=sys.stderr)
        return 2
    cluster = Cluster.load(args.name)
    if args.action == "down":
        cluster.down()
        return 0
    return cluster.exec(args.node, command or ["bash"]).returncode


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
