import os
from pathlib import Path

import pytest
import torch

# No network here: any hub download must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and the CI machine's two cores are shared; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank():
    """In-process runs of init_distributed fill in the rendezvous variables for one process (and keep its store
    listening on MASTER_PORT); put the variables back as they were, so later launcher subprocesses pick their own
    port instead of inheriting a port this process still holds."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture
def server():
    """The bundled sample shards served over HTTP on 127.0.0.1 by the fault-injecting test server."""
    from http_serve import ShardServer

    with ShardServer(Path(__file__).resolve().parents[1] / "shards" / "sample") as running:
        yield running


@pytest.fixture(scope="session")
def cluster():
    """Two namespace nodes with sshd, and a storage host that serves files over HTTP (Cluster.serve), shared by the
    session's multi-node tests (tests/cluster.py); always torn down, also when a test fails. Skipped, with the
    reason, where the machine cannot make namespaces (not root)."""
    from cluster import Cluster, remove_stale_clusters, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    remove_stale_clusters()
    nodes = Cluster(nodes=2, name=f"mt{os.getpid()}", storage=True).up()
    try:
        yield nodes
    finally:
        nodes.down()


@pytest.fixture(scope="session")
def multinode_reference(tmp_path_factory) -> Path:
    """tests/test_multinode.py's one-node, 2-rank reference run (ZeRO-3 bf16 to its STOP_AT), run once for every
    multi-node test file that compares against it."""
    from test_multinode import run_reference

    return run_reference(tmp_path_factory.mktemp("one-node") / "run")
