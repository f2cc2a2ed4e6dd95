#!/usr/bin/env bash
# Fill .whl/ (git-ignored: .gitignore and .git/info/exclude) with the wheels bench/gpu_suite.py needs on the lent
# nvidia-h200 machine and that its image lacks (/work/.library/device/KINDS.md: Python 3.12.3, torch 2.11.0+cu130,
# torchvision 0.26.0, timm, numpy, huggingface_hub, safetensors, einops, msgpack, ninja, psutil, py-cpuinfo, regex,
# pyyaml, tqdm, typing-extensions are there; no network there). Never commit wheels. Then run the suite in one call
# as bench/RESULTS.md ("## GPU suite") says: the wheels go to /tmp/site there with --no-index --no-deps.
#
# The set (mimscale's imports reached from bench/gpu_suite.py, then their Requires-Dist not in the image):
#   deepspeed 0.19.8       sdist only on PyPI: built here (DS_BUILD_OPS=0) into a pure py3-none-any wheel; its
#                          ops JIT-build there if ever needed (the suite uses none: torch's fused AdamW)
#     hjson, pydantic + pydantic-core (cp312 manylinux) + annotated-types + typing-inspection
#     typing-extensions    the image has one of unknown version; pydantic-core needs >= 4.14.1 (Sentinel), and an
#                          older one would lose the whole suite at `import deepspeed`, so carry it (45 KB)
#   open_clip_torch 3.3.0  CLIP teachers at random weights;  ftfy -> wcwidth
#   webdataset 1.0.2       shards;  braceexpand
#   timm 1.0.31            the image has a timm of unknown version; our wrappers touch its internals
#                          (patch_embed, blocks), so carry the version pyproject pins and CI tests
#   torchcodec 0.17.0      batched nvJPEG (data.decode=device). PyPI's 0.17 wheel is the cu130 build, ABI-stable
#                          against torch >= 2.11 (built with TORCH_TARGET_VERSION=2.11; its README pairs 0.12-0.16
#                          with ">=2.11"); 0.11, the one pinned to 2.11, is a +cpu build with no decode_jpeg.
#                          Image decoding needs no FFmpeg. If it fails to load, the suite uses torchvision's decoder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
PINS=(
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    typing-extensions==4.16.0
    open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0
    webdataset==1.0.2 braceexpand==0.1.7
    timm==1.0.31
    torchcodec==0.17.0
)
DEEPSPEED=deepspeed==0.19.8

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
grep -qxF '/.whl/' .gitignore || { echo "add /.whl/ to .gitignore first" >&2; exit 1; }

rm -rf "$DEST" && mkdir -p "$DEST"   # exactly this set: two versions of one package stop the install there
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${PINS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$DEST" "$DEEPSPEED"

"$PY" - "$DEST" "${PINS[@]}" "$DEEPSPEED" <<'EOF'
"""Check the set: one wheel per pin, deepspeed pure python, every requirement carried or in the device image."""
import re, sys, zipfile
from pathlib import Path

dest, pins = Path(sys.argv[1]), sys.argv[2:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
image = {norm(n) for n in """torch torchvision numpy huggingface-hub safetensors einops msgpack ninja psutil py-cpuinfo
    packaging pyyaml regex tqdm typing-extensions pillow fsspec matplotlib tensorboard nvidia-ml-py""".split()}
wheels = sorted(dest.glob("*.whl"))
carried = {norm(w.name.split("-")[0]) for w in wheels}
assert len(wheels) == len(pins) == len(carried), f"expected one wheel per pin {pins}, got {[w.name for w in wheels]}"
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    if wheel.name.startswith("deepspeed-"):
        binaries = [n for n in names if n.endswith((".so", ".pyd"))]
        assert wheel.name.endswith("py3-none-any.whl") and not binaries, f"deepspeed wheel not pure: {binaries}"
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line).group(1))
            if req not in carried and req not in image:
                missing.append(f"{wheel.name}: {line}")
assert not missing, "requirements neither carried nor in the device image:\n" + "\n".join(missing)
print(f"{len(wheels)} wheels, every requirement carried or in the device image")
EOF

ls -l "$DEST"
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $((wheels / 1024 / 1024)) MiB; with the tree that travels ($((tree / 1024 / 1024)) MiB):" \
    "$(((wheels + tree) / 1024 / 1024)) MiB of the 64 MiB a call may carry"
if ((wheels + tree > 56 * 1024 * 1024)); then echo "too close to the 64 MiB limit" >&2; exit 1; fi
