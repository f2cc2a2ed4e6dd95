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
(20 of 100 epochs), min lr 2.5e-7, gradient clipping 5. bf16 autocast on GPU. Mixup/CutMix and RandAugment of the
papers are left out: the training set is loaded into memory and augmented with random shifts (and flips, if asked),
which suits the small labelled sets this command is for; fine-tune at ImageNet scale with timm's train.py on an
export (``--model local-dir:OUT --pretrained --layer-decay 0.65``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIMMIM_BASE_LR = 1.25e-3  # per 512 images
LAYER_DECAY = {"vit": 0.65, "swin": 0.9}


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
    shift: int = -1  # random shift in pixels for augmentation; -1 = image size / 8
    hflip: bool = False
    eval_every: int = 0
    seed: int = 0


def default_layer_decay(model: nn.Module) -> float:
    return LAYER_DECAY["swin" if hasattr(model, "layers") and not hasattr(model, "blocks") else "vit"]


def is_export(spec: str) -> bool:
    path = Path(spec)
    return (
        not spec.startswith("random:") and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    )


def data_config(spec: str, overrides=()) -> dict:
    """Input size and normalisation the backbone was trained with, read from its config (no weights loaded)."""
    from mimscale.config import from_dict
    from mimscale.engine import checkpoint as ckpt
    from mimscale.eval.export import random_init_config

    if is_export(spec):
        path = Path(spec) / "config.json"
        if path.stat().st_size > 1 << 20:
            raise ValueError(f"{path} is over 1 MiB: not a timm config.json (re-export with `mimscale export`)")
        try:
            pcfg = json.loads(path.read_text())["pretrained_cfg"]
            return {"image_size": int(pcfg["input_size"][-1]), "mean": list(pcfg["mean"]), "std": list(pcfg["std"])}
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(
                f"{path} has no usable pretrained_cfg ({err!r}); re-export with `mimscale export`"
            ) from err
    if spec.startswith("random:"):
        cfg = random_init_config(spec[len("random:") :], overrides)
    else:
        cfg = from_dict(ckpt.read_meta(ckpt.checkpoint_dir(Path(spec)))["config"])
    return {"image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}


def build_classifier(spec: str, num_classes: int, *, drop_path: float, overrides=()) -> nn.Module:
    """A timm classifier with a fresh ``num_classes`` head on the backbone ``spec`` names.

    An export goes through timm's own loader (``local-dir:``, ``pretrained=True, num_classes=N``), exactly as a
    timm fine-tuning script would; a run folder's trained backbone or a ``random:`` twin is copied into
    ``timm.create_model(arch, num_classes=N)``.
    """
    import timm

    if overrides and not spec.startswith("random:"):
        raise ValueError(f"--set only applies to random:<config> models; {spec} keeps its trained architecture")
    if is_export(spec):
        return timm.create_model(
            f"local-dir:{spec}", pretrained=True, num_classes=num_classes, drop_path_rate=drop_path
        )
    from mimscale.eval.export import load_student, random_init_config
    from mimscale.models.students import build_student

    if spec.startswith("random:"):
        cfg = random_init_config(spec[len("random:") :], overrides)
        seed = torch.get_rng_state()
        torch.manual_seed(cfg.run.seed)  # exactly the twin `mimscale train` would start from
        backbone = build_student(cfg).backbone
        torch.set_rng_state(seed)
    else:
        student, cfg, _, _ = load_student(spec)
        backbone = student.backbone
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
    model.eval()
    correct = 0
    for start in range(0, len(images), 256):
        with autocast():
            logits = model(images[start : start + 256].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + 256]).sum())
    model.train()
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


def finetune(model: nn.Module, train: tuple, val: tuple, recipe: Recipe, device: torch.device, log=print) -> dict:
    """Fine-tune ``model`` for ``recipe.steps`` steps; returns {top1, history, ...}. bf16 autocast on CUDA."""
    images, labels = train
    model.to(device).train()
    optimizer, schedule, decay = build_optimizer_and_schedule(model, recipe)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)

    generator = torch.Generator().manual_seed(recipe.seed)
    shift = images.shape[-1] // 8 if recipe.shift < 0 else recipe.shift
    order, cursor, history, start = torch.randperm(len(images), generator=generator), 0, [], time.perf_counter()
    for step in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):  # a new epoch: reshuffle, drop the short remainder
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        batch = augment(images[index], shift, recipe.hflip, generator).to(device, non_blocking=True)
        schedule.step_update(step)
        with autocast():
            loss = F.cross_entropy(model(batch), labels[index].to(device), label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
        optimizer.step()
        if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps):
            top1 = accuracy(model, *val, device, autocast)
            history.append({"step": step + 1, "loss": float(loss.detach()), "top1": top1})
            log(
                f"finetune step {step + 1}/{recipe.steps} | loss {float(loss.detach()):.4f} | val top-1 {100 * top1:.2f}%"
            )
    top1 = history[-1]["top1"] if history and history[-1]["step"] == recipe.steps else None
    top1 = accuracy(model, *val, device, autocast) if top1 is None else top1
    loss = float(loss.detach())
    if not math.isfinite(loss):
        raise ValueError(f"the fine-tuning loss became {loss}; lower --blr or raise --warmup")
    return {"top1": top1, "final_loss": loss, "layer_decay": decay, "history": history,
            "seconds": time.perf_counter() - start}  # fmt: skip


def run_finetune(args: argparse.Namespace) -> int:
    from mimscale.engine.distributed import resolve_device_kind

    device = torch.device(resolve_device_kind(args.device))
    data = data_config(args.model, args.set)
    data["image_size"] = args.image_size or data["image_size"]
    train = load_labelled(args.train, "--train", data)
    val = load_labelled(args.val, "--val", data)
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    torch.manual_seed(args.seed)  # the new head's init and drop path: the same for every backbone compared
    model = build_classifier(args.model, num_classes, drop_path=args.drop_path, overrides=args.set)
    if data["image_size"] != int(model.patch_embed.img_size[0]):
        from mimscale.eval.probe import resize_input

        resize_input(model, data["image_size"])
    steps = args.steps or args.epochs * max(1, len(train[1]) // args.batch_size)
    recipe = Recipe(
        steps=steps, batch_size=args.batch_size, lr=args.blr * args.batch_size / 512, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, warmup_steps=int(args.warmup * steps),
        min_lr=args.min_lr, clip_grad=args.clip_grad, hflip=args.hflip, eval_every=args.eval_every, seed=args.seed,
    )  # fmt: skip
    result = finetune(model, train, val, recipe, device, log=(lambda *_: None) if args.json else print)
    result.update({"model": args.model, "protocol": "finetune", "image_size": data["image_size"],
                   "train_samples": len(train[1]), "val_samples": len(val[1]), "num_classes": num_classes,
                   "drop_path": args.drop_path, "device": device.type, "recipe": asdict(recipe)})  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"finetune top-1 {100 * result['top1']:.2f}% ({steps} steps, lr {recipe.lr:.2e}, layer decay "
            f"{result['layer_decay']}, {data['image_size']}px, {len(train[1])} train / {len(val[1])} val) {args.model}"
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
    group.add_argument("--label-smoothing", type=float, default=0.1)
    group.add_argument("--warmup", type=float, default=0.2, help="warmup as a fraction of the steps")
    group.add_argument("--min-lr", type=float, default=2.5e-7)
    group.add_argument("--clip-grad", type=float, default=5.0)
    group.add_argument("--hflip", action="store_true", help="random horizontal flips (off: digits and text)")
    group.add_argument("--eval-every", type=int, default=0, help="also report val top-1 every N steps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto (cuda when visible), cuda or cpu")
