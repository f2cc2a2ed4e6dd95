#!/usr/bin/env bash
# Download the wheels bench/gpu_suite.py needs on a GPU machine that may lack them into gpu_wheels/ (git-ignored;
# never commit wheels). Then carry that folder to the GPU machine (see bench/RESULTS.md, "GPU suite").
# torchcodec: batched nvJPEG for data.decode=device; the suite falls back to torchvision's decoder without it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu_wheels
python -m pip download --no-deps --only-binary=:all: --dest gpu_wheels "torchcodec>=0.17,<0.18"
ls -l gpu_wheels
