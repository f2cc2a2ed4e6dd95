#!/usr/bin/env bash
# A cluster of N nodes on this machine (root, Linux): network namespaces on a bridge (10.213.7.0/24), each node
# with its own hostname, process list, node-local disk and an sshd with a key made for it; the repository and the
# run folders stay shared. The multi-node tests use the same code (tests/cluster.py).
#   launch/local_cluster.sh up [N]                  N nodes (default 2) and a storage host (10.213.7.250, for
#                                                   tests/http_serve.py --bind 10.213.7.250); prints the hostfile
#   launch/local_cluster.sh exec NODE -- COMMAND    run COMMAND on node NODE (1..N), in this folder
#   launch/local_cluster.sh down                    stop every node, delete namespaces, bridge, keys
# Train on 2 nodes x 1 rank, started from node 1 as a user would on a real cluster:
#   launch/local_cluster.sh up
#   HOSTFILE=/tmp/mimscale-cluster-msc/hostfile-2x1 CONFIG=configs/demo_cpu.yaml \
#       launch/local_cluster.sh exec 1 -- launch/multi_node.sh --set run.output_dir=/tmp/mn-demo
#   launch/local_cluster.sh down
# Needs: iproute2, util-linux (unshare, nsenter), pdsh and openssh-server (apt-get install -y pdsh openssh-server).
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}
case "$action" in
    up) exec python tests/cluster.py up "${2:-2}" --storage ;;
    down) exec python tests/cluster.py down ;;
    exec)
        [ $# -ge 3 ] || { echo "usage: $0 exec NODE -- COMMAND" >&2; exit 2; }
        node=$2
        shift 2
        [ "${1:-}" = "--" ] && shift
        exec python tests/cluster.py exec "$node" -- "$@"
        ;;
    *) echo "usage: $0 up [N] | exec NODE -- COMMAND | down" >&2; exit 2 ;;
esac
