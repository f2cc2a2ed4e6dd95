#!/usr/bin/env bash
# The README's main job: SimMIM on the bundled sample shards, 2 ranks through the deepspeed launcher.
# On a machine without a GPU the ranks run on the CPU (gloo); with GPUs they take the first two.
# Extra arguments go to mimscale.train, e.g.: launch/cpu_demo.sh --set train.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
exec mimscale launch --num_gpus "${NUM_RANKS:-2}" --master_port "${MASTER_PORT:-29511}" \
    --module mimscale.train --config "${CONFIG:-configs/demo_cpu.yaml}" "$@"
