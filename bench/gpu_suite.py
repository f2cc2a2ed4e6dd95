"""Every GPU figure of the project in one run of at most 8 minutes on one H100/H200 (``--smoke``: seconds, on CPU).

    python bench/gpu_suite.py [--budget 450] [--results bench/RESULTS.md] [--out-dir DIR] [--only vit,decode]
    python bench/gpu_suite.py --smoke --results /tmp/RESULTS.md      # tiny sizes on CPU: proves the code runs

Sections (each guarded: a failure or a timeout is a row saying so, and the next section runs; each has its own
time budget and the whole run a global one; the compiled rows come last because compiling is what may not fit):

  vit       SimMIM ViT-B/16 224, bf16, eager: images/s and MFU (target >= 45 %)
  swin      SimMIM Swin-B 192 (window 6), bf16, eager: images/s and MFU (target >= 35 %)
  distill   MaskDistill vs MaskAlign, same ViT-B/16 student, CLIP ViT-B/16 teacher (random weights): images/s
            (target: MaskAlign >= 2x MaskDistill)
  decode    the stream at 224 px from ~500x375 JPEGs: data.decode=worker images/s on one core, against
            data.decode=device (worker-side images/s on one core, and the GPU decoder's images/s; target: the
            device decoder feeds >= 5x one worker core)
  planner   `mimscale plan`'s predicted peak (model states + teacher + micro-batch x activations) against
            torch.cuda.max_memory_allocated, measured in the vit and distill (MaskDistill) runs (target: within 15 %)
  zero3     one ZeRO-3 bf16 step (activation checkpointing) of the 1B MaskDistill preset, full width, 4 blocks
  compile-vit, compile-swin   the vit and swin rows with model.compile=true (attention + MLP of each block)

Throughput rows time the real engine step (mimscale.engine.loop.Trainer.train_step on the DeepSpeed engine, NaN
guard on) over pre-made uint8 batches, so they measure the model and engine, not the data stream. MFU = images/s
x the planner's FLOPs per image / the device's dense bf16 peak (mimscale.engine.metrics); with activation
checkpointing the FLOPs include the recompute, i.e. hardware-FLOPs utilisation. The table is printed and, with
--results, written into that markdown file between the gpu_suite markers (replacing the previous table);
--out-dir also gets the table, the rows as JSON and the updated results file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- gpu_suite:begin -->", "<!-- gpu_suite:end -->"


@dataclass
class Row:
    section: str
    what: str
    value: str
    target: str = ""
    verdict: str = ""  # met / not met / n/a / failed / skipped


@dataclass
class Suite:
    smoke: bool
    device: torch.device
    info: object
    deadline: float
    workdir: Path
    memory: dict = field(default_factory=dict)  # config name -> (batch, measured peak bytes) for the planner

    def configs(self, name: str) -> Path:
        return ROOT / "configs" / name


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM-based budget for one section (checked between Python bytecodes, so long kernels finish first)."""

    def expire(_signum, _frame):
        raise SectionTimeout(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------ engine runs


def base_settings(suite: Suite) -> list[str]:
    """bf16 on the GPU; --smoke runs fp32 (bf16 matmuls are slow on most CPUs) except the ZeRO-3 section."""
    return [
        f"run.device={suite.device.type}",
        f"run.output_dir={suite.workdir / 'run'}",
        "data.num_workers=0",
        "train.log_every=1000000",
        "train.progress_bar=false",
        f"deepspeed.precision={'fp32' if suite.smoke else 'bf16'}",
        "eval.knn_every=0",
    ]


def host_batches(cfg, method, count: int = 2) -> list[dict]:
    """uint8 images (normalised on the device, as GPU runs do) and the method's own masks, made once."""
    from mimscale.pipeline.masking import mask_generator_for

    generator, rng = mask_generator_for(cfg, method), np.random.default_rng(0)
    size, batch = cfg.data.image_size, cfg.data.batch_size
    batches = []
    for _ in range(count):
        image = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
        mask = torch.from_numpy(np.stack([generator(rng) for _ in range(batch)]))
        if torch.cuda.is_available():
            image, mask = image.pin_memory(), mask.pin_memory()
        batches.append({"image": image, "mask": mask, "sample_id": torch.arange(batch)})
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def eager_compile_in_smoke(smoke: bool) -> Iterator[None]:
    """--smoke traces with dynamo's eager backend (same graphs, no C++ compiler needed, seconds not minutes)."""
    if not smoke:
        yield
        return
    from functools import partialmethod
    from unittest import mock

    from mimscale.methods.base import MIMMethod

    eager = partialmethod(MIMMethod.compile_for_training, backend="eager")
    with mock.patch.object(MIMMethod, "compile_for_training", eager):
        yield


def measure_training(suite: Suite, config: str, settings: list[str], *, steps: int, warmup: int) -> dict:
    """images/s, MFU, step time and peak memory of the real engine step on pre-made batches."""
    from mimscale.config import load_config
    from mimscale.engine.flops import flops_per_image
    from mimscale.engine.loop import Trainer
    from mimscale.engine.metrics import peak_tflops

    cfg = load_config(suite.configs(config), base_settings(suite) + settings)
    baseline = 0
    if suite.device.type == "cuda":  # what earlier sections still hold is not this run's
        torch.cuda.reset_peak_memory_stats(suite.device)
        baseline = torch.cuda.memory_allocated(suite.device)
    with eager_compile_in_smoke(suite.smoke):
        trainer = Trainer(cfg, suite.info)
    source = itertools.cycle(host_batches(cfg, trainer.method))
    try:
        for _ in range(warmup):
            trainer.train_step(source)
        synchronize(suite.device)
        start = time.perf_counter()
        done = 0
        while done < steps and (done < 2 or time.perf_counter() - start < 0.5 * (suite.deadline - time.time())):
            trainer.train_step(source)
            done += 1
        synchronize(suite.device)
        elapsed = time.perf_counter() - start
        loss = trainer.accumulator.pop_means().get("loss", float("nan"))
    finally:
        del trainer
        release_memory()
    images_per_s = done * cfg.data.batch_size / elapsed
    peak = peak_tflops(suite.device, "bf16", 0.0)
    flops = flops_per_image(cfg)
    result = {"images_per_s": images_per_s, "step_s": elapsed / done, "loss": loss, "flops": flops, "cfg": cfg}
    result["mfu"] = images_per_s * flops / 1e12 / peak if peak else None
    if suite.device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(suite.device) - baseline
    return result


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mfu_row(section: str, what: str, result: dict, target: float) -> Row:
    value = f"{result['images_per_s']:,.0f} img/s, {1000 * result['step_s']:.0f} ms/step"
    if result["mfu"] is None:
        return Row(section, what, value + ", MFU n/a (no known peak)", f"MFU >= {target:.0%}", "n/a")
    verdict = "met" if result["mfu"] >= target else "not met"
    return Row(section, what, f"{value}, MFU {result['mfu']:.1%}", f"MFU >= {target:.0%}", verdict)


# ------------------------------------------------------------------------------------------------ sections

VIT = ("simmim_vit_base.yaml", ["data.batch_size=256"])
SWIN = ("simmim_swin_base.yaml", ["data.batch_size=256"])
VIT_SMOKE = ("demo_cpu.yaml", ["model.student_args.depth=2", "data.batch_size=4"])
SWIN_SMOKE = (
    "simmim_swin_base.yaml",
    [
        "model.student=swin_tiny_patch4_window7_224",
        "data.image_size=64",
        "data.batch_size=4",
        "mask.patch_size=32",
        "model.student_args={window_size: 4, embed_dim: 24, depths: [2, 2], num_heads: [1, 2]}",
    ],
)
RANDOM_TEACHER = ["teacher.random_init=true", "teacher.pretrained="]


def _steps(suite: Suite) -> dict:
    return {"steps": 3, "warmup": 1} if suite.smoke else {"steps": 30, "warmup": 5}


def section_vit(suite: Suite, compile_model: bool = False) -> list[Row]:
    config, settings = VIT_SMOKE if suite.smoke else VIT
    settings = [*settings, f"model.compile={str(compile_model).lower()}"]
    result = measure_training(suite, config, settings, **_steps(suite))
    if not compile_model and "peak_bytes" in result:
        suite.memory[config] = (result["cfg"], result["peak_bytes"])
    label = ("smoke: SimMIM ViT-Tiny/8 64px fp32" if suite.smoke else "SimMIM ViT-B/16 224 bf16, batch 256") + (
        ", model.compile" if compile_model else ", eager"
    )
    return [mfu_row("vit", label, result, 0.45)]


def section_swin(suite: Suite, compile_model: bool = False) -> list[Row]:
    config, settings = SWIN_SMOKE if suite.smoke else SWIN
    settings = [*settings, f"model.compile={str(compile_model).lower()}"]
    result = measure_training(suite, config, settings, **_steps(suite))
    label = ("smoke: SimMIM tiny Swin 64px fp32" if suite.smoke else "SimMIM Swin-B 192 bf16, batch 256") + (
        ", model.compile" if compile_model else ", eager"
    )
    return [mfu_row("swin", label, result, 0.35)]


def section_compile_vit(suite: Suite) -> list[Row]:
    return section_vit(suite, compile_model=True)


def section_compile_swin(suite: Suite) -> list[Row]:
    return section_swin(suite, compile_model=True)


def section_distill(suite: Suite) -> list[Row]:
    if suite.smoke:
        runs = {
            name: (f"demo_{name}.yaml", ["model.student_args.depth=2", "data.batch_size=4"])
            for name in ("maskdistill", "maskalign")
        }
    else:
        runs = {
            name: (f"{name}_vit_base_clip_b16.yaml", [*RANDOM_TEACHER, "data.batch_size=256"])
            for name in ("maskdistill", "maskalign")
        }
    results = {}
    for name, (config, settings) in runs.items():
        results[name] = measure_training(suite, config, settings, **_steps(suite))
        if name == "maskdistill" and "peak_bytes" in results[name]:
            suite.memory[config] = (results[name]["cfg"], results[name]["peak_bytes"])
    ratio = results["maskalign"]["images_per_s"] / results["maskdistill"]["images_per_s"]
    value = ", ".join(f"{name} {r['images_per_s']:,.0f} img/s" for name, r in results.items())
    return [
        Row(
            "distill",
            "MaskAlign / MaskDistill images/s, ViT-B/16 + CLIP-B/16 (random)",
            f"{value}: {ratio:.2f}x",
            "MaskAlign >= 2x",
            "met" if ratio >= 2 else "not met",
        )
    ]


def jpeg_shards(suite: Suite) -> tuple[str, int]:
    """ImageNet-like JPEGs (about 500x375, q90) from scikit-image photos as shards; smoke: the bundled samples."""
    if suite.smoke:
        return str(ROOT / "shards" / "sample" / "*.tar"), 64
    from mimscale.shards.create import CreateOptions, create_shards

    source, shards = suite.workdir / "jpegs", suite.workdir / "jpeg_shards"
    try:  # the photos come from scikit-image; without it, the bundled sample photos upscaled to the same size
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_data import make_jpeg_folder

        make_jpeg_folder(source, 512)
    except ImportError:
        upscale_sample_photos(source, 512)
    create_shards(str(source), shards, CreateOptions(samples_per_shard=128))
    return str(shards), 224


def upscale_sample_photos(folder: Path, count: int) -> None:
    """~500x375 JPEGs (q90) from the shards/sample photos: smoother than real photos, so decode is a bit cheaper."""
    import io

    from PIL import Image

    from mimscale.shards.index import index_shards
    from mimscale.shards.sets import expand_shards

    paths = expand_shards(str(ROOT / "shards" / "sample" / "*.tar"))
    payloads = []
    for path, index in zip(paths, index_shards(paths), strict=True):
        data = Path(path).read_bytes()
        payloads += [data[offset : offset + size] for offset, size in zip(index.offsets, index.sizes, strict=True)]
    for number in range(count):
        image = Image.open(io.BytesIO(payloads[number % len(payloads)])).convert("RGB")
        target = (500, 375) if number % 3 else (375, 500)
        (folder / "photos").mkdir(parents=True, exist_ok=True)
        image.resize(target, Image.BICUBIC).save(folder / "photos" / f"{number:05d}.jpg", quality=90)


def train_stream(shards: str, size: int, decode: str, workers: int = 0):
    from mimscale.config import load_config
    from mimscale.pipeline.masking import build_mask_generator
    from mimscale.pipeline.stream import build_train_loader

    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            "data.batch_size=32",
            f"data.image_size={size}",
            f"data.num_workers={workers}",
            f"data.decode={decode}",
            "mask.patch_size=32",
        ],
    )
    mask = build_mask_generator("random_cells", image_size=size, token_stride=16, ratio=0.6, cell_size=32)
    return build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask, normalise_on_device=True)


def stream_batches(shards: str, size: int, decode: str, count: int) -> tuple[list[dict], float]:
    """``count`` batches of 32 from the in-process stream (num_workers=0 = one worker core) and images/s."""
    batches = iter(train_stream(shards, size, decode))
    next(batches)  # indexing and first-batch costs are not timed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        kept = list(itertools.islice(batches, count))
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return kept, count * 32 / elapsed


def device_stream_row(suite: Suite, shards: str, size: int, reference: list[dict]) -> Row:
    """The whole data.decode=device path as training runs it (workers, producer thread, side CUDA stream): its
    batches must be the worker path's (same ids and masks; pixels within a few grey levels: nvJPEG's IDCT and
    chroma upsampling are not libjpeg-turbo's), and its images/s with 4 workers."""
    from mimscale.pipeline.device_decode import DeviceDecodedStream, DeviceDecoder

    workers = 1 if suite.smoke else 4
    stream = DeviceDecodedStream(train_stream(shards, size, "device", workers), DeviceDecoder(suite.device, size))
    batches = iter(stream)
    got = [next(batches) for _ in reference]  # the first batches include worker start-up: not timed
    count = 3 if suite.smoke else 24
    synchronize(suite.device)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    synchronize(suite.device)
    rate = count * 32 / (time.perf_counter() - start)
    batches.close()
    same_ids = all(
        torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["mask"], b["mask"].cpu())
        for a, b in zip(reference, got, strict=True)
    )
    pairs = zip(reference, got, strict=True)
    diff = torch.cat([(a["image"].int() - b["image"].cpu().int()).abs().flatten() for a, b in pairs])
    mean, worst = float(diff.float().mean()), int(diff.max())
    verdict = "met" if same_ids and mean < 2.0 else "not met"
    return Row(
        "decode",
        f"data.decode=device end to end ({workers} workers, producer thread), vs the worker path",
        f"{rate:,.0f} img/s; same ids/masks: {same_ids}; pixel diff mean {mean:.2f}, max {worst}",
        "same samples, mean diff < 2 levels",
        verdict,
    )


def decoder_rate(suite: Suite, host: list[dict], size: int, backend: str) -> float:
    """images/s of DeviceDecoder alone (decode + crop + resize + flip) over pre-made worker batches."""
    from mimscale.pipeline.device_decode import DeviceDecoder

    decoder = DeviceDecoder(suite.device, size, backend)
    decoder(host[0])  # warm-up: decoder handles, kernels
    synchronize(suite.device)
    rounds = 1 if suite.smoke else 4
    start = time.perf_counter()
    for _ in range(rounds):
        for batch in host:
            decoder(batch)
    synchronize(suite.device)
    if decoder.failures or decoder.backend != backend:
        raise RuntimeError(f"{backend}: {decoder.failures} images failed, backend now {decoder.backend}")
    return rounds * len(host) * 32 / (time.perf_counter() - start)


def section_decode(suite: Suite) -> list[Row]:
    from mimscale.pipeline.device_decode import jpeg_backend

    shards, size = jpeg_shards(suite)
    count = 3 if suite.smoke else 12
    reference, worker_rate = stream_batches(shards, size, "worker", count)
    host, deferred_rate = stream_batches(shards, size, "device", count)
    if suite.device.type == "cuda":
        host = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in host]
    rows = [
        Row("decode", f"data.decode=worker, {size}px, one core", f"{worker_rate:,.0f} img/s"),
        Row(
            "decode",
            "data.decode=device, worker side (read, header, crop box, mask), one core",
            f"{deferred_rate:,.0f} img/s ({deferred_rate / worker_rate:.1f}x the worker path)",
        ),
    ]
    try:
        rows.append(
            device_stream_row(suite, shards, size, list(itertools.islice(train_stream(shards, size, "worker"), 3)))
        )
    except Exception as err:  # noqa: BLE001 - the decoder rows below still run
        traceback.print_exc()
        rows.append(failed_row("decode", "data.decode=device end to end", err))
    default = jpeg_backend()
    for backend in dict.fromkeys([default, "torchvision"]):  # the default first; torchvision for comparison
        try:
            rate = decoder_rate(suite, host, size, backend)
        except Exception as err:  # noqa: BLE001 - one decoder failing must not lose the other's row
            rows.append(failed_row("decode", f"device decoder ({backend})", err))
            continue
        ratio = rate / worker_rate
        rows.append(
            Row(
                "decode",
                f"device decoder ({backend}, {suite.device.type}): decode+crop+resize+flip",
                f"{rate:,.0f} img/s = {ratio:.1f}x one worker core",
                ">= 5x one worker core",
                "met" if ratio >= 5 else "not met",
            )
        )
    return rows


def section_planner(suite: Suite) -> list[Row]:
    from mimscale.plan import make_plan

    wanted = (
        ["demo_cpu.yaml", "demo_maskdistill.yaml"] if suite.smoke else [VIT[0], "maskdistill_vit_base_clip_b16.yaml"]
    )
    rows = []
    for config in wanted:
        from mimscale.config import load_config

        settings = base_settings(suite) + (VIT_SMOKE[1] if suite.smoke else ["data.batch_size=256", *RANDOM_TEACHER])
        cfg = suite.memory.get(config, (load_config(suite.configs(config), settings), None))[0]
        memory = torch.cuda.get_device_properties(suite.device).total_memory if suite.device.type == "cuda" else 80e9
        plan = make_plan(cfg, gpus=1, gpu_memory_bytes=float(memory))
        batch = cfg.data.batch_size
        predicted = plan.model_state_bytes + plan.teacher_bytes + batch * plan.activation_bytes_per_sample
        measured = suite.memory.get(config, (None, None))[1]
        what = f"{config} batch {batch}: predicted peak"
        if measured is None:
            rows.append(
                Row("planner", what, f"{predicted / 2**30:.2f} GiB; measured n/a (no CUDA)", "within 15 %", "n/a")
            )
            continue
        error = predicted / measured - 1
        rows.append(
            Row(
                "planner",
                what + " vs max_memory_allocated",
                f"{predicted / 2**30:.2f} vs {measured / 2**30:.2f} GiB ({error:+.1%})",
                "within 15 %",
                "met" if abs(error) <= 0.15 else "not met",
            )
        )
    return rows


def section_zero3(suite: Suite) -> list[Row]:
    if suite.smoke:
        config = "demo_maskdistill.yaml"
        settings = [
            "model.student_args.depth=1",
            "data.batch_size=2",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=bf16",
            "deepspeed.activation_checkpointing=true",
        ]
    else:
        config = "maskdistill_vit_giant_1b.yaml"
        settings = [*RANDOM_TEACHER, "model.student_args.depth=4", "data.batch_size=32"]
    result = measure_training(suite, config, settings, steps=1, warmup=1)
    memory = f", peak {result['peak_bytes'] / 2**30:.1f} GiB" if "peak_bytes" in result else ""
    finite = np.isfinite(result["loss"])
    depth = "1 block, tiny" if suite.smoke else "full width, 4 blocks, batch 32, CLIP-L/14 random teacher"
    return [
        Row(
            "zero3",
            f"{config}, ZeRO-3 bf16 + checkpointing ({depth}): one step",
            f"{result['step_s']:.2f} s/step, loss {result['loss']:.4f}{memory}",
            "runs, finite loss",
            "met" if finite else "not met",
        )
    ]


SECTIONS: list[tuple[str, float, Callable[[Suite], list[Row]]]] = [
    ("vit", 60, section_vit),
    ("swin", 60, section_swin),
    ("distill", 80, section_distill),
    ("decode", 90, section_decode),
    ("planner", 30, section_planner),
    ("zero3", 70, section_zero3),
    ("compile-vit", 120, section_compile_vit),
    ("compile-swin", 150, section_compile_swin),
]


# ------------------------------------------------------------------------------------------------ running, writing


def failed_row(section: str, what: str, err: BaseException) -> Row:
    message = " ".join(str(err).split())[:160]
    return Row(section, what, f"{type(err).__name__}: {message}", verdict="failed")


def run_sections(suite: Suite, only: set[str] | None) -> list[Row]:
    rows: list[Row] = []
    for name, budget, section in SECTIONS:
        if only and name not in only:
            continue
        budget *= 5 if suite.smoke else 1  # smoke: seconds when quiet; its budgets only guard a loaded CI box
        left = suite.deadline - time.time()
        if left < min(budget, 20):
            rows.append(Row(name, "section", f"not run: {left:.0f} s left of the global budget", verdict="skipped"))
            continue
        started = time.perf_counter()
        try:
            with time_limit(min(budget, left)):
                produced = section(suite)
            for row in produced if suite.smoke else ():
                row.verdict = row.verdict if row.verdict == "failed" else "smoke"  # CPU, tiny: no verdicts
            rows += produced
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
            traceback.print_exc()
            rows.append(failed_row(name, "section", err))
        finally:
            release_memory()
        print(f"[gpu_suite] {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return rows


def format_table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| section | what | measured | target | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.what} | {r.value} | {r.target} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def write_results(path: Path, table: str) -> None:
    """Replace the table between the gpu_suite markers (appended as a new section the first time)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + f"\n\n## GPU suite (bench/gpu_suite.py)\n\n{block}\n"
    path.write_text(text)


def describe_machine(device: torch.device, smoke: bool) -> str:
    import deepspeed
    import timm

    from mimscale.pipeline.device_decode import jpeg_backend

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    mode = "--smoke (tiny sizes, not figures)" if smoke else "full"
    return (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {name}; torch {torch.__version__}, "
        f"deepspeed {deepspeed.__version__}, timm {timm.__version__}, JPEG decoder {jpeg_backend()}; "
        f"mode {mode}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds): the code path, no figures")
    parser.add_argument("--budget", type=float, help="global time budget in seconds (450; --smoke: 1800)")
    parser.add_argument("--results", type=Path, help="markdown file to write the table into (full runs: RESULTS.md)")
    parser.add_argument("--out-dir", type=Path, help="also write table.md, rows.json and the results file here")
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    args = parser.parse_args(argv)
    started = time.time()
    args.budget = args.budget or (1800.0 if args.smoke else 450.0)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run with --smoke for the CPU check of the code path", file=sys.stderr)
        return 2
    results = args.results or (None if args.smoke else ROOT / "bench" / "RESULTS.md")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mimscale.engine.distributed import init_distributed, shutdown

    info = init_distributed("cpu" if args.smoke else "cuda")
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        suite = Suite(args.smoke, info.device, info, started + args.budget, Path(workdir))
        rows = run_sections(suite, {name for name in args.only.split(",") if name} or None)
    table = format_table(rows, describe_machine(info.device, args.smoke) + f" Total {time.time() - started:.0f} s.")
    print(table, flush=True)
    if results:
        write_results(results, table)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "table.md").write_text(table + "\n")
        (args.out_dir / "rows.json").write_text(json.dumps([asdict(row) for row in rows], indent=1))
        if results:
            (args.out_dir / results.name).write_text(results.read_text())
    shutdown()
    return 1 if any(row.verdict == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
