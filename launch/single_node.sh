#!/usr/bin/env bash
# One node, all its GPUs: one process per GPU through the deepspeed launcher (`mimscale launch`: a SIGTERM/SIGUSR1
# sent anywhere, scancel included, ends in one checkpoint and exit 75).
#   CONFIG    config file (default configs/simmim_vit_base.yaml)
#   NUM_GPUS  GPUs to use (default: all that nvidia-smi lists)
#   MASTER_PORT rendezvous port (default 29500)
# Extra arguments go to mimscale.train (e.g. --set data.shards=/data/in1k/train-{000000..001023}.tar).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NUM_GPUS" -lt 1 ]; then
    echo "no GPU found: set NUM_GPUS, or use launch/cpu_demo.sh on a CPU machine" >&2
    exit 2
fi
exec mimscale launch --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module mimscale.train --config "${CONFIG:-configs/simmim_vit_base.yaml}" "$@"
