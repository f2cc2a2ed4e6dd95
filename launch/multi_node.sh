#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile (passwordless ssh between nodes, the same
# repository path and Python environment on every node, shards on a shared filesystem).
#   HOSTFILE     hostfile (default launch/hostfile; see launch/hostfile.example)
#   MASTER_ADDR  address of the first node, reachable from all nodes (default: first host in the hostfile)
#   MASTER_PORT  rendezvous port (default 29500)
#   CONFIG       config file
# NCCL settings that often matter on clusters (export them here; the launcher forwards variables listed in
# ~/.deepspeed_env or exported with the NCCL_ prefix): NCCL_SOCKET_IFNAME, NCCL_IB_HCA.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found: copy launch/hostfile.example and edit it" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --module mimscale.train --config "${CONFIG:-configs/simmim_vit_base_224.yaml}" "$@"
