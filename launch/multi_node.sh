#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (`mimscale launch`: deepspeed's, starting each node over ssh with
# SIGTERM/SIGUSR1 forwarded to every node so all ranks checkpoint and the job exits 75, and a failed or dead node
# ending the job) and a hostfile (passwordless ssh between nodes, the same repository path and Python environment
# on every node, shards on a shared filesystem). Tested on two namespace nodes: see launch/local_cluster.sh.
#   launch/multi_node.sh [TRAIN ARGS]                      e.g. --set data.shards=/data/in1k/train-{000000..001023}.tar
#   launch/multi_node.sh [LAUNCHER FLAGS] -- [TRAIN ARGS]  flags before `--` go to the deepspeed launcher
#                                                          (e.g. --no_ssh_check --master_addr 10.0.0.1 --include ...)
#   HOSTFILE     hostfile (default launch/hostfile; see launch/hostfile.example)
#   MASTER_ADDR  address of the first node, reachable from all nodes (default: first host in the hostfile)
#   MASTER_PORT  rendezvous port (default 29500)
#   CONFIG       config file (default configs/simmim_vit_base.yaml)
# One host: a hostfile whose only line names this machine (`localhost slots=8`) runs locally, without the
# launcher's ssh check (DeepSpeed would otherwise ssh to localhost and stop when that fails), on 127.0.0.1.
# Only PYTHON*/NCCL_* variables reach the other nodes by themselves; put others (HF_HUB_OFFLINE, OMP_NUM_THREADS)
# in .deepspeed_env (home or this folder) or a file named by DS_ENV_FILE, one NAME=value per line. Each rank sets
# GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface that routes to MASTER_ADDR unless you set it;
# NCCL_IB_HCA often matters too. pdsh must be installed (DeepSpeed's runner checks for it; ssh starts the nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
CONFIG=${CONFIG:-configs/simmim_vit_base.yaml}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found: copy launch/hostfile.example and edit it" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "config $CONFIG not found: set CONFIG to a file in configs/" >&2; exit 2; }

launcher_flags=()
for arg in "$@"; do
    if [ "$arg" = "--" ]; then  # everything before it is for the launcher
        while [ "$1" != "--" ]; do launcher_flags+=("$1"); shift; done
        shift
        break
    fi
done

hosts=$(sed 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
if [ "$(printf '%s\n' "$hosts" | wc -l)" -eq 1 ]; then
    case "$hosts" in
        localhost | 127.0.0.1 | "$(hostname)" | "$(hostname -s)")
            launcher_flags=(--no_ssh_check "${launcher_flags[@]}")
            MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
            ;;
    esac
fi
MASTER_ADDR=${MASTER_ADDR:-$(printf '%s\n' "$hosts" | head -n 1)}
# Launcher flags given by the caller come last, so they win over these defaults (argparse keeps the last value).
exec mimscale launch --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    "${launcher_flags[@]}" --module mimscale.train --config "$CONFIG" "$@"
