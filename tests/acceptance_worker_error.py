"""Run by test_acceptance: a DataLoader worker error while the stop signals are blocked (as in training) must end
the process, not hang it at exit. argv[1]: a copy of a shard folder whose index is damaged here."""

import struct
import sys

from mimscale.config import load_config
from mimscale.engine import preempt
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader
from mimscale.shards.index import SetIndex

folder = sys.argv[1]
index = SetIndex(f"{folder}/samples.idx")
raw = bytearray(open(index.path, "rb").read())
for row in range(index.num_samples):  # every sample's offset points far outside its shard
    struct.pack_into("<I", raw, index.rows_at + 12 * row, 10**6)
open(index.path, "wb").write(raw)
cfg = load_config(
    None, [f"data.shards={folder}/*.tar", "data.batch_size=4", "data.image_size=32", "data.num_workers=2"]
)
mask = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)
batches = iter(build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask))
preempt.install_stop_handlers()
try:
    with preempt.signals_kept_from_children():
        next(batches)
except Exception as err:
    print("error:", type(err).__name__, str(err).splitlines()[-1], flush=True)
    sys.exit(2)
