"""`mimscale eval finetune`: end-to-end fine-tuning with layer-wise lr decay, the protocol MIM papers report.

The model is a timm classifier: an export through timm's own ``local-dir:`` loader (``num_classes=N``, a new head),
a run folder's trained backbone, or ``random:<config | run folder>`` (the same architecture at random init, the
baseline), copied into ``timm.create_model(arch, num_classes=N)``. The optimizer comes from timm's
``create_optimizer_v2(..., layer_decay=...)`` (``param_groups_layer_decay``: block i of L gets lr x
decay^(L - i), no weight decay on norms, biases, position embeddings and tokens) and the schedule from timm's
``CosineLRScheduler`` (linear warmup, cosine to min_lr, per step), which applies the groups' ``lr_scale``.

Defaults follow SimMIM's fine-tuning configs (microsoft/SimMIM, configs/*/simmim_finetune__*.yaml; BEiT's are the
same family): AdamW (0.9, 0.999), base lr 1.25e-3 per 512 images scaled linearly with the batch, weight decay
0.05, layer decay 0.65 for ViT and 0.9 for Swin, drop path 0.1, label smoothing 0.1, warmup 20 % of the steps
(20 of 100 epochs), min lr 2.5e-7, gradient clipping 5. bf16 autocast on GPU.

Augmentation (``--aug paper``, the default) is the papers' too, through timm as SimMIM's config.py and MAE's
main_finetune.py set it: ``create_transform`` with RandAugment ``rand-m9-mstd0.5-inc1``, bicubic random-resized crops
(area 0.08-1), random erasing 0.25 (pixel mode, one box; no colour jitter, which timm drops under RandAugment), and
``Mixup`` (mixup 0.8, cutmix 1.0, switch prob 0.5, per batch, label smoothing 0.1) with ``SoftTargetCrossEntropy``.
Tiny images (under 64 px, e.g. the 8x8 digits upscaled to 32) keep the whole image instead of a random-resized
crop: an 8 % crop of a 32-px digit is 9x9 pixels and no longer shows the class; RandAugment's translations still
move it (``--crop-scale`` overrides). ``--aug light`` is the small-data path: random shifts (and flips, if asked)
and label-smoothed cross-entropy, no Mixup unless ``--mixup/--cutmix`` ask. Horizontal flips stay off unless
``--hflip`` (the papers flip ImageNet; digits and text must not be flipped). ``--ema DECAY`` keeps timm's
``ModelEmaV3`` of the weights and reports its val top-1 beside the live weights'.

The labelled set is held in memory at the eval crop (resize, centre crop) and augmented from there, which suits the
small labelled sets this command is for; fine-tune at ImageNet scale with timm's train.py on an export
(``--model local-dir:OUT --pretrained --layer-decay 0.65``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mimscale.models.backbone import Backbone

SIMMIM_BASE_LR = 1.25e-3  # per 512 images
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # SimMIM's AUG.AUTO_AUGMENT, MAE's --aa
PAPER_MIXUP, PAPER_CUTMIX, PAPER_REPROB = 0.8, 1.0, 0.25  # SimMIM's AUG.MIXUP / CUTMIX / REPROB (MAE's README)
PAPER_CROP_SCALE = 0.08  # timm's RandomResizedCrop default area range (0.08, 1), as both papers use it
TINY_IMAGE = 64  # below this side, the paper path keeps the whole image (see the module docstring)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Recipe:
    """One fine-tuning run; ``lr`` is the absolute peak lr (base lr x batch / 512)."""

    steps: int
    batch_size: int = 64
    lr: float = SIMMIM_BASE_LR * 64 / 512
    layer_decay: float | None = None  # None: 0.65 (ViT) / 0.9 (Swin)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_steps: int = 0
    min_lr: float = 2.5e-7
    clip_grad: float = 5.0
    aug: str = "paper"  # paper: timm's create_transform (RandAugment, erasing); light: random shifts
    auto_augment: str = RAND_AUGMENT  # paper only; "" for none
    reprob: float = PAPER_REPROB  # random erasing probability (paper only)
    crop_scale: float | None = None  # lower area bound of the random-resized crop (paper); None: 0.08, 1 if tiny
    mixup: float = PAPER_MIXUP  # Mixup alpha (0 = off); with cutmix > 0 too, timm switches per batch
    cutmix: float = PAPER_CUTMIX  # CutMix alpha (0 = off)
    shift: int = -1  # random shift in pixels (light); -1 = image size / 8
    hflip: bool = False
    ema: float = 0.0  # EMA decay of the weights (timm's ModelEmaV3); 0 = no EMA
    ema_warmup: bool = False  # timm's EMA warmup (decay ramps up: short runs)
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be in [{low}, {high}], got {value}"
            for name, value, low, high in (
                ("mixup", self.mixup, 0, math.inf),
                ("cutmix", self.cutmix, 0, math.inf),
                ("reprob", self.reprob, 0, 1),
                ("ema", self.ema, 0, 1),
                ("label smoothing", self.label_smoothing, 0, 1),
                ("crop scale", 1.0 if self.crop_scale is None else self.crop_scale, 1e-6, 1),
            )
            if not low <= value <= high
        ]
        if self.aug not in ("paper", "light"):
            problems.append(f"aug must be paper or light, got {self.aug!r}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            problems.append(
                f"Mixup/CutMix pair the images of a batch: the batch size must be even, got {self.batch_size}"
            )
        if problems:
            raise ValueError("fine-tuning recipe: " + "; ".join(problems) + " (see `mimscale eval finetune --help`)")


def default_layer_decay(model: nn.Module) -> float:
    """The papers' layer decay for the model's family (0.65 ViT, 0.9 Swin), which models/backbone.py knows."""
    return Backbone(model).layer_decay


def build_classifier(
    spec: str, num_classes: int, *, drop_path: float, overrides=(), trusted: bool = False, pool: str = "cls"
) -> nn.Module:
    """A timm classifier with a fresh ``num_classes`` head on the backbone ``spec`` names.

    An export goes through timm's own loader (``local-dir:``, ``pretrained=True, num_classes=N``), exactly as a
    timm fine-tuning script would; a run folder's trained backbone or a ``random:`` twin is copied into
    ``timm.create_model(arch, num_classes=N)``. ``trusted``: the command's safe_load.trust_decision.
    ``pool``: what the head reads: ``cls`` the class token (timm's ViT default), ``mean`` the patch tokens
    averaged (timm's ``global_pool="avg"``, set after loading, so the pretrained final norm stays in place; MAE's
    and BEiT's fine-tuning put a fresh LayerNorm after the average instead). Swin always averages.
    """
    model = _classifier_with_loaded_backbone(spec, num_classes, drop_path, overrides, trusted)
    if pool == "mean" and getattr(model, "global_pool", "avg") != "avg":
        model.reset_classifier(num_classes, global_pool="avg")
    return model


def _classifier_with_loaded_backbone(spec: str, num_classes: int, drop_path: float, overrides, trusted: bool):
    import timm

    from mimscale.eval.export import resolve_model_spec, student_backbone

    resolved = resolve_model_spec(spec, overrides, trusted=trusted)
    if resolved.kind == "export":
        return timm.create_model(
            f"local-dir:{resolved.text}", pretrained=True, num_classes=num_classes, drop_path_rate=drop_path
        )
    seed = torch.get_rng_state()
    backbone, cfg = student_backbone(resolved)  # a random twin is exactly the one `mimscale train` would start from
    if resolved.kind == "random":
        torch.set_rng_state(seed)
    kwargs = {"img_size": cfg.data.image_size, **cfg.model.student_args}
    model = timm.create_model(cfg.model.student, **kwargs, num_classes=num_classes, drop_path_rate=drop_path)
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    if unexpected or any(not name.startswith(classifier) for name in missing):
        raise ValueError(f"{spec}: the backbone does not fit {cfg.model.student}: {missing[:5]} {unexpected[:5]}")
    return model


def load_labelled(pattern: str, key: str, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labelled sample of the shards, resized and centre-cropped, in memory: (images [N,3,S,S], labels [N])."""
    from mimscale.pipeline.stream import iter_eval_batches

    batches = list(
        iter_eval_batches(
            pattern, image_size=data["image_size"], batch_size=256, mean=data["mean"], std=data["std"], key=key
        )
    )
    if not batches:
        raise ValueError(f"{key} {pattern}: no images found")
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).long()
    if bool((labels < 0).any()):
        raise ValueError(
            f"{key} {pattern}: {int((labels < 0).sum())} of {len(labels)} samples have no .cls label; fine-tuning "
            "needs labelled shards (write <key>.cls files, e.g. `mimscale shards create` from a CSV with labels)"
        )
    return images, labels


def augment(images: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (reflect padding), optional horizontal flip."""
    if shift > 0:
        size = images.shape[-1]
        padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        images = padded[..., dy : dy + size, dx : dx + size]
    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        images = images.flip(-1)
    return images


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, autocast) -> float:
    """Top-1 on ``images`` in eval mode; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), 256):
        with autocast():
            logits = model(images[start : start + 256].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + 256]).sum())
    model.train(was_training)
    return correct / len(images)


def build_optimizer_and_schedule(model: nn.Module, recipe: Recipe):
    """timm's AdamW over layer-decayed parameter groups, and timm's warmup + cosine schedule stepped per update."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    decay = default_layer_decay(model) if recipe.layer_decay is None else recipe.layer_decay
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay, layer_decay=decay, betas=(0.9, 0.999)
    )
    schedule = CosineLRScheduler(
        optimizer,
        t_initial=recipe.steps,
        lr_min=recipe.min_lr,
        warmup_t=recipe.warmup_steps,
        warmup_lr_init=recipe.min_lr,
        t_in_epochs=False,
    )
    return optimizer, schedule, decay


def paper_transform(image_size: int, recipe: Recipe, mean, std):
    """timm's training transform with the papers' settings (MAE's util/datasets.py build_transform, SimMIM's AUG)."""
    from timm.data import create_transform

    crop_min = recipe.crop_scale
    if crop_min is None:
        crop_min = 1.0 if image_size < TINY_IMAGE else PAPER_CROP_SCALE
    transform = create_transform(
        image_size,
        is_training=True,
        scale=(crop_min, 1.0),
        ratio=(1.0, 1.0) if crop_min >= 1.0 else None,  # the whole image, unsquashed
        hflip=0.5 if recipe.hflip else 0.0,
        color_jitter=None,  # timm ignores colour jitter under RandAugment; MAE passes None
        auto_augment=recipe.auto_augment or None,
        interpolation="bicubic",
        re_prob=recipe.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    keep_zero_bit_posterize(transform)
    return transform


def posterize_zero_bits_black(img, bits_to_keep, **_):
    """timm's RandAugment posterize with Pillow's answer before Pillow 13 for 0 bits: a black image (every bit
    masked). Pillow 13 refuses 0 bits, which timm's increasing posterize asks for at magnitude 10: with the papers'
    rand-m9-mstd0.5 that is ~2 % of its draws, so a fine-tune of a few thousand images stopped with "bits must be
    between or equal to 1 and 8"."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def keep_zero_bit_posterize(transform) -> int:
    """Give the posterize ops of a timm transform's RandAugment the 0-bit answer they had before Pillow 13
    (this transform's ops only; timm is not changed). Returns how many ops were given it."""
    from timm.data.auto_augment import RandAugment, posterize

    changed = 0
    for step in getattr(transform, "transforms", []):
        for op in step.ops if isinstance(step, RandAugment) else []:
            if op.aug_fn is posterize:
                op.aug_fn, changed = posterize_zero_bits_black, changed + 1
    return changed


def to_uint8_images(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised [N,3,S,S] tensors back to the uint8 HWC pixels timm's PIL transforms start from."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = ((images * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


class BatchAugmenter:
    """Training batches and targets from the in-memory set, and the loss that fits those targets.

    paper: each image through ``paper_transform``; light: the batch shifted (and flipped) as a whole. Mixup/CutMix
    (either alpha > 0) make soft targets, fitted with ``SoftTargetCrossEntropy`` (label smoothing inside Mixup, as
    MAE and SimMIM do it); without them, label-smoothed cross-entropy. timm's transforms and Mixup draw from
    Python's and NumPy's global generators: both are seeded here from ``recipe.seed`` so a run repeats.
    """

    def __init__(self, images: torch.Tensor, num_classes: int, recipe: Recipe, mean, std):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        self.images, self.recipe = images, recipe
        self.generator = torch.Generator().manual_seed(recipe.seed)
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
        self.shift = images.shape[-1] // 8 if recipe.shift < 0 else recipe.shift
        self.pixels = to_uint8_images(images, mean, std) if recipe.aug == "paper" else None
        self.transform = paper_transform(images.shape[-1], recipe, mean, std) if recipe.aug == "paper" else None
        self.mixup = None
        self.criterion: nn.Module = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        if recipe.mixup > 0 or recipe.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=recipe.mixup,
                cutmix_alpha=recipe.cutmix,
                prob=1.0,
                switch_prob=0.5,
                mode="batch",
                label_smoothing=recipe.label_smoothing,
                num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()

    def __call__(self, index: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B,3,S,S], targets: class ids [B], or soft targets [B,C] under Mixup/CutMix)."""
        from PIL import Image

        if self.transform is not None:
            batch = torch.stack([self.transform(Image.fromarray(self.pixels[int(i)])) for i in index])
        else:
            batch = augment(self.images[index], self.shift, self.recipe.hflip, self.generator)
        if self.mixup is not None:
            return self.mixup(batch, labels)
        return batch, labels


class FineTuning:
    """One fine-tuning run: the model, timm's optimizer and schedule, the batch augmenter and the optional EMA."""

    def __init__(self, model: nn.Module, train: tuple, recipe: Recipe, device: torch.device, *, mean, std):
        from timm.utils import ModelEmaV3

        self.images, self.labels = train
        self.model, self.recipe, self.device = model.to(device).train(), recipe, device
        self.optimizer, self.schedule, self.layer_decay = build_optimizer_and_schedule(model, recipe)
        num_classes = int(getattr(model, "num_classes", 0) or int(self.labels.max()) + 1)
        self.augmenter = BatchAugmenter(self.images, num_classes, recipe, mean, std)
        self.ema = ModelEmaV3(model, decay=recipe.ema, use_warmup=recipe.ema_warmup) if recipe.ema > 0 else None
        self.order, self.cursor = torch.randperm(len(self.images), generator=self.augmenter.generator), 0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def next_index(self) -> torch.Tensor:
        """The next batch of sample indices; a new epoch reshuffles and drops the short remainder."""
        if self.cursor + self.recipe.batch_size > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.images), generator=self.augmenter.generator), 0
        self.cursor += self.recipe.batch_size
        return self.order[self.cursor - self.recipe.batch_size : self.cursor]

    def step(self, step: int) -> float:
        index = self.next_index()
        batch, targets = self.augmenter(index, self.labels[index])
        self.schedule.step_update(step)
        with self.autocast():
            loss = self.augmenter.criterion(
                self.model(batch.to(self.device, non_blocking=True)), targets.to(self.device)
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return float(loss.detach())

    def evaluate(self, val: tuple) -> dict[str, float]:
        """Val top-1 of the live weights, and of the EMA weights when kept."""
        scores = {"top1": accuracy(self.model, *val, self.device, self.autocast)}
        if self.ema is not None:
            scores["top1_ema"] = accuracy(self.ema.module, *val, self.device, self.autocast)
        return scores

    def run(self, val: tuple, log=print) -> dict:
        recipe, history, start, loss = self.recipe, [], time.perf_counter(), float("nan")
        for step in range(recipe.steps):
            loss = self.step(step)
            if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps):
                scores = self.evaluate(val)
                history.append({"step": step + 1, "loss": loss, **scores})
                shown = " | ".join(
                    f"val {name.replace('top1', 'top-1')} {100 * value:.2f}%" for name, value in scores.items()
                )
                log(f"finetune step {step + 1}/{recipe.steps} | loss {loss:.4f} | {shown}")
        if not math.isfinite(loss):
            raise ValueError(f"the fine-tuning loss became {loss}; lower --blr or raise --warmup")
        final = history[-1] if history and history[-1]["step"] == recipe.steps else self.evaluate(val)
        scores = {key: value for key, value in final.items() if key.startswith("top1")}
        return {
            **scores,
            "final_loss": loss,
            "layer_decay": self.layer_decay,
            "history": history,
            "criterion": type(self.augmenter.criterion).__name__,
            "seconds": time.perf_counter() - start,
        }


def finetune(
    model: nn.Module,
    train: tuple,
    val: tuple,
    recipe: Recipe,
    device: torch.device,
    log=print,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> dict:
    """Fine-tune ``model`` for ``recipe.steps`` steps; returns {top1[, top1_ema], history, ...}. bf16 on CUDA.

    ``train`` and ``val`` are (normalised images, labels); ``mean``/``std`` are their normalisation, which the paper
    path undoes to run timm's PIL transforms.
    """
    return FineTuning(model, train, recipe, device, mean=mean, std=std).run(val, log)


def recipe_from_args(args: argparse.Namespace, steps: int) -> Recipe:
    """The Recipe the command line asks for; --mixup/--cutmix default to the papers' under --aug paper, 0 else."""
    paper = args.aug == "paper"
    mixup = (PAPER_MIXUP if paper else 0.0) if args.mixup is None else args.mixup
    cutmix = (PAPER_CUTMIX if paper else 0.0) if args.cutmix is None else args.cutmix
    return Recipe(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.blr * args.batch_size / 512,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        warmup_steps=int(args.warmup * steps),
        min_lr=args.min_lr,
        clip_grad=args.clip_grad,
        aug=args.aug,
        auto_augment="" if args.aa == "none" else args.aa,
        reprob=args.reprob,
        crop_scale=args.crop_scale,
        mixup=mixup,
        cutmix=cutmix,
        hflip=args.hflip,
        ema=args.ema,
        ema_warmup=args.ema_warmup,
        eval_every=args.eval_every,
        seed=args.seed,
    )


def run_finetune(args: argparse.Namespace) -> int:
    from mimscale.engine.distributed import resolve_device_kind
    from mimscale.engine.safe_load import trust_decision
    from mimscale.eval.export import input_settings, resolve_model_spec

    recipe_from_args(args, steps=1)  # a bad option fails before any data or weights are loaded
    device = torch.device(resolve_device_kind(args.device))
    trusted = trust_decision(args)
    data = input_settings(resolve_model_spec(args.model, args.set, trusted=trusted))
    data["image_size"] = args.image_size or data["image_size"]
    train = load_labelled(args.train, "--train", data)
    val = load_labelled(args.val, "--val", data)
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    torch.manual_seed(args.seed)  # the new head's init and drop path: the same for every backbone compared
    model = build_classifier(
        args.model, num_classes, drop_path=args.drop_path, overrides=args.set, trusted=trusted, pool=args.pool
    )
    if data["image_size"] != Backbone(model).image_size:
        from mimscale.eval.probe import resize_input

        resize_input(model, data["image_size"])
    steps = args.steps or args.epochs * max(1, len(train[1]) // args.batch_size)
    recipe = recipe_from_args(args, steps)
    log = (lambda *_: None) if args.json else print
    result = finetune(model, train, val, recipe, device, log=log, mean=data["mean"], std=data["std"])
    result.update(
        {
            "model": args.model,
            "protocol": "finetune",
            "pool": args.pool,
            "image_size": data["image_size"],
            "train_samples": len(train[1]),
            "val_samples": len(val[1]),
            "num_classes": num_classes,
            "drop_path": args.drop_path,
            "device": device.type,
            "recipe": asdict(recipe),
        }
    )
    if args.json:
        print(json.dumps(result))
    else:
        ema = f", EMA {100 * result['top1_ema']:.2f}%" if "top1_ema" in result else ""
        print(
            f"finetune top-1 {100 * result['top1']:.2f}%{ema} ({steps} steps, aug {recipe.aug}, "
            f"{result['criterion']}, lr {recipe.lr:.2e}, layer decay {result['layer_decay']}, {data['image_size']}px, "
            f"{len(train[1])} train / {len(val[1])} val) {args.model}"
        )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fine-tuning options of `mimscale eval finetune` (the eval parser is shared with knn/linear)."""
    group = parser.add_argument_group("finetune (SimMIM's fine-tuning recipe by default)")
    group.add_argument("--steps", type=int, default=0, help="optimizer steps (default: --epochs over --train)")
    group.add_argument("--blr", type=float, default=SIMMIM_BASE_LR, help="base lr per 512 images (scaled by batch)")
    group.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise lr decay (default 0.65 ViT, 0.9 Swin)"
    )
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--drop-path", type=float, default=0.1)
    group.add_argument("--label-smoothing", "--smoothing", type=float, default=0.1)
    group.add_argument("--warmup", type=float, default=0.2, help="warmup as a fraction of the steps")
    group.add_argument("--min-lr", type=float, default=2.5e-7)
    group.add_argument("--clip-grad", type=float, default=5.0)
    group.add_argument(
        "--aug",
        choices=("paper", "light"),
        default="paper",
        help="paper: timm's create_transform with RandAugment and random erasing, plus Mixup/CutMix (MAE, SimMIM); "
        "light: random shifts of up to 1/8 of the image, no Mixup unless --mixup/--cutmix",
    )
    group.add_argument("--aa", default=RAND_AUGMENT, help="RandAugment policy of --aug paper (none: off)")
    group.add_argument("--reprob", type=float, default=PAPER_REPROB, help="random erasing probability (--aug paper)")
    group.add_argument(
        "--crop-scale",
        type=float,
        default=None,
        help=f"lower area bound of the random-resized crop (--aug paper; default {PAPER_CROP_SCALE}, or 1 = the whole "
        f"image under {TINY_IMAGE} px)",
    )
    group.add_argument("--mixup", type=float, default=None, help=f"Mixup alpha (default {PAPER_MIXUP} paper, 0 light)")
    group.add_argument(
        "--cutmix", type=float, default=None, help=f"CutMix alpha (default {PAPER_CUTMIX} paper, 0 light)"
    )
    group.add_argument("--hflip", action="store_true", help="random horizontal flips (off: digits and text)")
    group.add_argument(
        "--ema", type=float, default=0.0, metavar="DECAY", help="also keep an EMA of the weights and report its top-1"
    )
    group.add_argument("--ema-warmup", action="store_true", help="timm's EMA warmup (the decay ramps up; short runs)")
    group.add_argument("--eval-every", type=int, default=0, help="also report val top-1 every N steps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
