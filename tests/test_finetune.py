"""`mimscale eval finetune`: timm's layer-decay groups and schedule as configured, the papers' augmentation
(RandAugment, random erasing, Mixup/CutMix with soft targets) as MAE sets it, the EMA, learning, and the CLI."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.eval.export import write_export
from mimscale.eval.finetune import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugmenter,
    FineTuning,
    Recipe,
    accuracy,
    build_optimizer_and_schedule,
    finetune,
    load_labelled,
    paper_transform,
    to_uint8_images,
)
from mimscale.models.students import build_student

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
DIGITS_VAL = str(REPO / "shards" / "digits" / "val-000.tar")


LIGHT = {"aug": "light", "mixup": 0.0, "cutmix": 0.0}  # today's small-data path: shifts, label-smoothed CE


def tiny_vit(num_classes: int = 3, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=depth, embed_dim=48
    )


def test_layer_decay_scales_each_block_and_the_schedule_applies_them(one_torch_thread) -> None:
    model = tiny_vit(depth=2)
    recipe = Recipe(steps=10, lr=1e-3, layer_decay=0.5, warmup_steps=2, min_lr=0.0)
    optimizer, schedule, decay = build_optimizer_and_schedule(model, recipe)
    assert decay == 0.5
    schedule.step_update(2)  # end of warmup; the cosine runs over all steps, warmup included (as SimMIM sets it)
    peak = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 10))
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {
        names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    # stem (patch_embed, cls_token, pos_embed) = layer 0, block i = layer i + 1, final norm + head = layer 3
    assert lr_of["patch_embed.proj.weight"][0] == pytest.approx(peak * 0.5**3)
    assert lr_of["blocks.0.attn.qkv.weight"][0] == pytest.approx(peak * 0.5**2)
    assert lr_of["blocks.1.mlp.fc1.weight"][0] == pytest.approx(peak * 0.5)
    assert lr_of["head.weight"][0] == pytest.approx(peak)
    assert lr_of["blocks.1.mlp.fc1.weight"][1] == 0.05 and lr_of["blocks.1.norm1.weight"][1] == 0.0  # no decay on norms
    assert lr_of["pos_embed"][1] == 0.0 and lr_of["blocks.0.attn.qkv.bias"][1] == 0.0
    schedule.step_update(10)
    assert max(group["lr"] for group in optimizer.param_groups) == pytest.approx(0.0, abs=1e-12)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=2,
        img_size=32,
        embed_dim=24,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
    )
    assert build_optimizer_and_schedule(swin, Recipe(steps=1))[2] == 0.9  # SimMIM's Swin default


def colour_task() -> tuple[tuple, tuple]:
    """96 noise images whose class is the dominant colour channel: (train 64, val 32)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=generator)
    images = torch.randn(96, 3, 32, 32, generator=generator) * 0.3
    images[torch.arange(96), labels] += 1.5
    return (images[:64], labels[:64]), (images[64:], labels[64:])


def test_finetune_learns_a_separable_task(one_torch_thread) -> None:
    train, val = colour_task()
    recipe = Recipe(steps=30, batch_size=16, lr=2e-3, layer_decay=0.75, warmup_steps=3, eval_every=15, **LIGHT)
    result = finetune(tiny_vit(depth=1), train, val, recipe, torch.device("cpu"), log=lambda *_: None)
    assert [entry["step"] for entry in result["history"]] == [15, 30]
    assert result["top1"] >= 0.9 and result["final_loss"] < 1.0  # chance is 1/3, and log(3) = 1.1
    assert result["criterion"] == "CrossEntropyLoss" and "top1_ema" not in result


def test_ema_weights_differ_from_the_live_ones_and_are_what_top1_ema_measures(one_torch_thread) -> None:
    train, val = colour_task()
    cpu = torch.device("cpu")
    recipe = dict(steps=30, batch_size=16, lr=2e-3, layer_decay=0.75, warmup_steps=10, eval_every=15, **LIGHT)
    untouched = tiny_vit(depth=1)
    frozen_ema = FineTuning(
        copy.deepcopy(untouched), train, Recipe(**recipe, ema=1.0), cpu, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    result = frozen_ema.run(val, log=lambda *_: None)
    # timm's ModelEmaV3 copies the weights at its first two updates and averages from then on; at decay 1 it keeps
    # that copy, so its top-1 is that of a run stopped after two steps, not the live weights'
    assert result["top1"] >= 0.9
    assert [sorted(entry) for entry in result["history"]] == [["loss", "step", "top1", "top1_ema"]] * 2
    two_steps = FineTuning(tiny_vit(depth=1), train, Recipe(**recipe), cpu, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in range(2):  # in the warmup: lr 2.5e-7 then 2e-4, the same whatever the run's length
        two_steps.step(step)
    frozen, early = frozen_ema.ema.module.state_dict(), two_steps.model.state_dict()
    assert all(torch.equal(frozen[name], early[name]) for name in early)
    assert result["top1_ema"] == accuracy(two_steps.model, *val, cpu, two_steps.autocast) < 0.8

    tuning = FineTuning(tiny_vit(depth=1), train, Recipe(**recipe, ema=0.9), cpu, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    result = tuning.run(val, log=lambda *_: None)
    live, ema, start = tuning.model.state_dict(), tuning.ema.module.state_dict(), untouched.state_dict()
    assert max(float((live[k] - ema[k]).abs().max()) for k in live) > 1e-4  # a lagging average, not a copy
    assert max(float((start[k] - ema[k]).abs().max()) for k in live) > 1e-4  # and it moved with training
    assert result["top1_ema"] == accuracy(tuning.ema.module, *val, cpu, tuning.autocast)
    assert not tuning.ema.module.training and tuning.model.training  # evaluating leaves both modes as they were


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 240 val digits at 32 px (8x8 images upscaled), ImageNet-normalised, as `eval finetune` loads them."""
    return load_labelled(DIGITS_VAL, "--val", {"image_size": 32, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})


def seeded(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_randaugment_and_random_erasing_change_pixels_repeatably(digits) -> None:
    images = digits[0][:8]
    pixels = to_uint8_images(images, IMAGENET_MEAN, IMAGENET_STD)
    plain = paper_transform(32, Recipe(steps=1, auto_augment="", reprob=0.0), IMAGENET_MEAN, IMAGENET_STD)
    originals = torch.stack([plain(Image.fromarray(p)) for p in pixels])  # tiny: the whole image, no crop
    assert torch.allclose(originals, images, atol=0.6 / 255 / min(IMAGENET_STD))  # only uint8 rounding

    erasing = paper_transform(32, Recipe(steps=1, auto_augment="", reprob=1.0), IMAGENET_MEAN, IMAGENET_STD)
    seeded()
    erased = torch.stack([erasing(Image.fromarray(p)) for p in pixels])
    for before, after in zip(originals, erased, strict=True):
        changed = (before != after).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)  # one box of random pixels, 2 % to 1/3 of the area
        assert 0.02 * 32 * 32 * 0.9 <= box <= 32 * 32 / 3 * 1.1 and int(changed.sum()) >= 0.9 * int(box)

    randaugment = paper_transform(32, Recipe(steps=1, reprob=0.0), IMAGENET_MEAN, IMAGENET_STD)
    runs = []
    for _ in range(2):
        seeded()
        runs.append(torch.stack([randaugment(Image.fromarray(p)) for p in pixels]))
    assert torch.equal(runs[0], runs[1])  # the same seed, the same augmentation
    moved = [not torch.allclose(a, b) for a, b in zip(runs[0], originals, strict=True)]
    assert sum(moved) >= 4, moved  # two ops at p=0.5 each: a few images may pass unchanged


def test_paper_transform_is_maes_and_keeps_tiny_images_whole() -> None:
    from timm.data import create_transform

    # MAE util/datasets.py build_transform (is_train), transcribed with its main_finetune.py defaults
    mae = create_transform(
        input_size=96,
        is_training=True,
        color_jitter=None,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    ours = paper_transform(96, Recipe(steps=1, hflip=True), IMAGENET_MEAN, IMAGENET_STD)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 100, 3), dtype=np.uint8))
    for seed in range(6):
        outputs = []
        for transform in (mae, ours):
            seeded(seed)
            outputs.append(transform(image))
        assert torch.equal(*outputs), seed
    assert repr(mae) == repr(ours)
    crop = paper_transform(32, Recipe(steps=1), IMAGENET_MEAN, IMAGENET_STD).transforms[0]
    assert crop.scale == (1.0, 1.0) and crop.ratio == (1.0, 1.0)  # under 64 px: the whole image
    assert paper_transform(64, Recipe(steps=1), IMAGENET_MEAN, IMAGENET_STD).transforms[0].scale == (0.08, 1.0)
    override = paper_transform(32, Recipe(steps=1, crop_scale=0.5), IMAGENET_MEAN, IMAGENET_STD)
    assert override.transforms[0].scale == (0.5, 1.0)


def test_randaugment_posterize_at_magnitude_10_gives_a_black_image_instead_of_stopping_the_run() -> None:
    """rand-m9-mstd0.5-inc1 draws magnitude 10 for ~2 % of its ops; timm's increasing posterize then keeps 0 bits,
    which Pillow 13 refuses: the papers' fine-tune stopped after a few hundred images (bench_finetune, 2026-12-02)."""
    import PIL
    from PIL import ImageOps
    from timm.data.auto_augment import RandAugment

    transform = paper_transform(32, Recipe(steps=1), IMAGENET_MEAN, IMAGENET_STD)
    [augment] = [step for step in transform.transforms if isinstance(step, RandAugment)]
    [posterize] = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0.0  # the draw that stopped runs
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    assert not np.asarray(posterize(image)).any()  # every bit masked, as Pillow before 13 gave it
    posterize.magnitude = 9  # 1 bit kept: Pillow's own posterize, unchanged
    assert np.array_equal(np.asarray(posterize(image)), np.asarray(ImageOps.posterize(image, 1)))
    if int(PIL.__version__.split(".")[0]) >= 13:
        with pytest.raises(ValueError, match="bits must be between"):
            ImageOps.posterize(image, 0)  # the cause, while Pillow keeps refusing it


def test_paper_path_on_digits_mixes_targets_and_fits_them_with_soft_target_cross_entropy(digits, one_torch_thread):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    images, labels = digits
    recipe = Recipe(steps=3, batch_size=16, lr=1e-3, eval_every=3)
    augmenter = BatchAugmenter(images, 10, recipe, IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(augmenter.criterion, SoftTargetCrossEntropy)
    index = torch.arange(16)
    batch, targets = augmenter(index, labels[index])
    assert batch.shape == (16, 3, 32, 32) and targets.shape == (16, 10)
    off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10
    own = torch.full((16, 10), off).scatter_(1, labels[index, None], on)
    gap = own - own.flip(0)  # Mixup pairs image i with image B-1-i: targets = lam own + (1 - lam) flipped
    lam = float(((targets - own.flip(0)) * gap).sum() / (gap * gap).sum())
    assert 0.0 < lam < 1.0 and torch.allclose(targets, lam * own + (1 - lam) * own.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(16))

    # the Mixup MAE's main_finetune.py builds from its arguments (--mixup 0.8 --cutmix 1.0 as its README runs it)
    mae_mixup = Mixup(
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        cutmix_minmax=None,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.1,
        num_classes=10,
    )
    for seed in range(4):
        outputs = []
        for mix in (mae_mixup, augmenter.mixup):
            seeded(seed)
            outputs.append(mix(images[:16].clone(), labels[:16]))
        assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])

    model = tiny_vit(num_classes=10, depth=1)
    result = finetune(
        model, (images, labels), (images[:64], labels[:64]), recipe, torch.device("cpu"), log=lambda *_: None
    )
    assert result["criterion"] == "SoftTargetCrossEntropy" and math.isfinite(result["final_loss"])
    assert 0.0 <= result["top1"] <= 1.0 and [entry["step"] for entry in result["history"]] == [3]


def test_bad_recipes_are_refused_naming_the_option() -> None:
    with pytest.raises(ValueError, match="batch size must be even"):
        Recipe(steps=1, batch_size=15)
    Recipe(steps=1, batch_size=15, **LIGHT)  # no Mixup: any batch size
    with pytest.raises(ValueError, match=r"reprob must be in \[0, 1\], got 1.5.*ema must be in"):
        Recipe(steps=1, reprob=1.5, ema=-0.1)
    with pytest.raises(ValueError, match="aug must be paper or light"):
        Recipe(steps=1, aug="heavy")


def test_finetune_cli_on_an_export_and_on_a_random_twin(tmp_path: Path, capsys, one_torch_thread) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {DEMO}\ndata:\n  image_size: 32\nmodel:\n  student_args: {{patch_size: 8, depth: 1}}\n")
    cfg = load_config(config, [])
    torch.manual_seed(cfg.run.seed)  # as random:<config> builds its twin
    write_export(build_student(cfg).backbone, cfg, tmp_path / "export", {"test": "finetune"})
    common = ["--train", DIGITS_VAL, "--val", DIGITS_VAL, "--steps", "2", "--batch-size", "16", "--json"]
    results = {}
    for name, model in (("export", str(tmp_path / "export")), ("random", f"random:{config}")):
        assert cli_main(["eval", "finetune", "--model", model, *common]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for result in results.values():
        assert result["num_classes"] == 10 and result["train_samples"] == 240 and result["image_size"] == 32
        assert result["recipe"]["lr"] == pytest.approx(1.25e-3 * 16 / 512) and result["layer_decay"] == 0.65
        assert result["recipe"]["label_smoothing"] == 0.1 and result["drop_path"] == 0.1
        assert 0.0 <= result["top1"] <= 1.0
        assert result["recipe"]["aug"] == "paper" and result["criterion"] == "SoftTargetCrossEntropy"
        assert (result["recipe"]["mixup"], result["recipe"]["cutmix"], result["recipe"]["reprob"]) == (0.8, 1.0, 0.25)
    # the export holds the twin's very weights: same head init, same data order -> the same run
    assert results["export"]["final_loss"] == pytest.approx(results["random"]["final_loss"], rel=1e-4)
    light = ["--aug", "light", "--ema", "0.5", "--smoothing", "0.2"]
    assert cli_main(["eval", "finetune", "--model", str(tmp_path / "export"), *common, *light]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["criterion"] == "CrossEntropyLoss" and result["recipe"]["mixup"] == 0.0 and "top1_ema" in result
    assert result["recipe"]["label_smoothing"] == 0.2 and result["recipe"]["ema"] == 0.5
    assert (
        cli_main(
            ["eval", "finetune", "--model", str(tmp_path / "export"), *common[:-3], "--batch-size", "15", "--json"]
        )
        == 2
    )
    assert "the batch size must be even, got 15" in capsys.readouterr().err
    assert (
        cli_main(["eval", "finetune", "--model", str(tmp_path / "export"), "--set", "data.image_size=64", *common]) == 2
    )
    assert "--set only applies to random:<config> models" in capsys.readouterr().err
    (tmp_path / "export" / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    assert cli_main(["eval", "finetune", "--model", str(tmp_path / "export"), *common]) == 2
    assert "has no usable pretrained_cfg" in capsys.readouterr().err


def test_pool_mean_heads_read_the_averaged_patch_tokens_and_cls_the_class_token(tmp_path: Path, one_torch_thread):
    """`eval finetune --pool mean` (MAE's, BEiT's and SimMIM's fine-tuning pool) gives the head the patch tokens'
    mean, not the class token, on the very backbone `--pool cls` loads."""
    from mimscale.eval.finetune import build_classifier

    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {DEMO}\ndata:\n  image_size: 32\nmodel:\n  student_args: {{patch_size: 8, depth: 1}}\n")
    models = {pool: build_classifier(f"random:{config}", 10, drop_path=0.0, pool=pool) for pool in ("cls", "mean")}
    models["mean"].head.load_state_dict(models["cls"].head.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = models["cls"].forward_features(images)
        assert torch.equal(tokens, models["mean"].forward_features(images))  # the same backbone weights
        head = models["cls"].head
        torch.testing.assert_close(models["cls"](images), head(tokens[:, 0]))
        torch.testing.assert_close(models["mean"](images), head(tokens[:, 1:].mean(dim=1)))
