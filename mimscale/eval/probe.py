"""Frozen-feature evaluation: weighted kNN (DINO's protocol) and a linear probe (`mimscale eval knn|linear`, and
in-run monitors; both registered in eval/evaluators.py).

kNN: L2-normalised features, cosine similarity to every training feature, the k nearest vote with weight
exp(sim / T) (k=20, T=0.07 as in DINO's eval_knn). It needs no training, so the engine can call
``knn_top1`` during a run to watch representation quality. The linear probe standardises the features
(train statistics), trains a softmax classifier with SGD + cosine schedule over a small lr x weight-decay grid
and reports the best validation accuracy (the usual, optimistic, protocol of MIM papers).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.models.backbone import Backbone

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
DEFAULT_LRS = (0.01, 0.1, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


def _param_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters())
    return param.dtype, param.device


def pool_features(features: torch.Tensor, model: nn.Module, pool: str) -> torch.Tensor:
    """[B, C] from forward_features: ViT tokens [B, P+N, C] (cls or patch mean), Swin maps [B, h, w, C] (mean).

    A model without a class token (Swin, ViT with no cls) is average-pooled for ``pool="cls"`` as well.
    """
    if pool not in ("cls", "mean"):
        raise ValueError(f"pool={pool!r} is not valid; use cls or mean")
    if features.ndim == 4:  # NHWC stage output
        return features.mean(dim=(1, 2))
    if features.ndim != 3:
        raise ValueError(f"unexpected feature shape {tuple(features.shape)} from {type(model).__name__}")
    arch = Backbone(model)
    if pool == "cls" and arch.has_class_token:
        return features[:, 0]
    return features[:, arch.num_prefix_tokens :].mean(dim=1)


def block_count(model: nn.Module) -> int:
    """How many layers ``--layer`` can pick from: ViT blocks, or Swin stages."""
    return Backbone(model).depth


def layer_features(model: nn.Module, images: torch.Tensor, layer: int | None) -> torch.Tensor:
    """Tokens [B, P+N, C] (ViT) or maps [B, h, w, C] (Swin) for ``pool_features``.

    ``layer=None``: ``forward_features`` (last layer, final norm). Otherwise the raw output of ViT block / Swin stage
    ``layer`` (1-based; -1 = the last one, before the final norm), through timm's ``forward_intermediates``.
    """
    if layer is None:
        return model.forward_features(images)
    arch = Backbone(model)
    count = arch.depth
    if layer == 0 or not -count <= layer <= count:
        raise ValueError(
            f"--layer {layer} is out of range: {type(model).__name__} has {count} (1..{count} or -1..-{count})"
        )
    index = layer - 1 if layer > 0 else count + layer
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"{type(model).__name__} has no forward_intermediates; use a timm ViT/Swin or leave --layer out"
        )
    if arch.is_swin_like:  # NCHW stage maps -> NHWC, as forward_features gives them
        (maps,) = model.forward_intermediates(images, indices=[index], intermediates_only=True)
        return maps.permute(0, 2, 3, 1)
    if arch.num_prefix_tokens == 0:
        (tokens,) = model.forward_intermediates(images, indices=[index], output_fmt="NLC", intermediates_only=True)
        return tokens
    ((tokens, prefix),) = model.forward_intermediates(
        images, indices=[index], return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
    )
    return torch.cat([prefix, tokens], dim=1)


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Batches, *, pool: str = "cls", layer: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, C], labels int64 [N]) with the model in eval mode; its mode is restored after.

    ``layer`` picks an intermediate ViT block / Swin stage (see ``layer_features``); None = the final features.
    """
    dtype, device = _param_dtype_device(model)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, batch_labels in batches:
            out = layer_features(model, images.to(device=device, dtype=dtype), layer)
            feats.append(pool_features(out, model, pool).float().cpu())
            labels.append(batch_labels.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("no images to extract features from: the shards are empty or unlabelled")
    all_labels = torch.cat(labels).long()
    if bool((all_labels < 0).any()):
        raise ValueError(
            f"{int((all_labels < 0).sum())} of {len(all_labels)} samples have no .cls label; kNN and linear probing "
            "need labelled shards (write <key>.cls files, e.g. with `mimscale shards create` from a CSV with labels)"
        )
    return torch.cat(feats), all_labels


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Class predictions [M] by exp(cos/T)-weighted voting of the k nearest training features."""
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    predictions = []
    for start in range(0, len(query_feats), chunk):
        query = F.normalize(query_feats[start : start + chunk].float(), dim=1)
        sims, index = (query @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(train_feats, train_labels, val_feats, val_labels, *, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of the weighted kNN classifier on the validation features."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, val_feats, k=k, temperature=temperature, num_classes=num_classes)
    return float((pred == val_labels).float().mean())


def knn_top1(
    backbone: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "cls",
) -> float:
    """In-run monitor: kNN top-1 of a timm backbone; restores its train/eval mode, casts to its dtype."""
    train_feats, train_labels = extract_features(backbone, train_batches, pool=pool)
    val_feats, val_labels = extract_features(backbone, val_batches, pool=pool)
    return knn_accuracy(train_feats, train_labels, val_feats, val_labels, k=k, temperature=temperature)


def _in_run_batches(cfg, pattern: str, key: str) -> Batches:
    """Labelled eval shards at the training run's image size, through its node cache when they are remote."""
    from mimscale.pipeline.stream import iter_eval_batches

    data = cfg.data
    return iter_eval_batches(
        pattern,
        image_size=data.image_size,
        batch_size=data.batch_size,
        mean=data.mean,
        std=data.std,
        key=key,
        data_cfg=data,  # remote eval shards share the training run's node cache
    )


def in_run_knn(cfg) -> Callable[[nn.Module], dict[str, float]]:
    """The kNN monitor (``eval.monitor: knn``, every ``eval.knn_every`` steps): the student backbone's kNN top-1
    on ``eval.train_shards`` / ``eval.val_shards`` as ``{"eval/knn_top1": top1}``."""

    def evaluate(backbone: nn.Module) -> dict[str, float]:
        top1 = knn_top1(
            backbone,
            _in_run_batches(cfg, cfg.eval.train_shards, "eval.train_shards"),
            _in_run_batches(cfg, cfg.eval.val_shards, "eval.val_shards"),
            k=cfg.eval.k,
            temperature=cfg.eval.temperature,
            pool=cfg.eval.pool,
        )
        return {"eval/knn_top1": top1}

    return evaluate


def in_run_linear(cfg) -> Callable[[nn.Module], dict[str, float]]:
    """The linear-probe monitor (``eval.monitor: linear``): the best probe top-1 on the same shards as kNN's."""

    def evaluate(backbone: nn.Module) -> dict[str, float]:
        train_batches = _in_run_batches(cfg, cfg.eval.train_shards, "eval.train_shards")
        val_batches = _in_run_batches(cfg, cfg.eval.val_shards, "eval.val_shards")
        train = extract_features(backbone, train_batches, pool=cfg.eval.pool)
        val = extract_features(backbone, val_batches, pool=cfg.eval.pool)
        return {"eval/linear_top1": linear_probe(*train, *val, seed=cfg.run.seed)["top1"]}

    return evaluate


def _train_linear_grid(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: torch.Tensor,
    decays: torch.Tensor,
    *,
    epochs: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one softmax classifier per (lr, weight decay) pair at once: SGD, momentum 0.9, cosine schedule.

    The grid is a batch dimension (weights [G, D, K]), so the whole sweep costs about as much as one run.
    """
    generator = torch.Generator().manual_seed(seed)
    grid = len(lrs)
    weight = torch.zeros(grid, x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(grid, 1, num_classes, requires_grad=True)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    batch_size = min(256, len(x))
    total_steps = epochs * math.ceil(len(x) / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            logits = x[index] @ weight + bias  # [G, B, K]
            target = y[index].repeat(grid)
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target) * grid  # sum of per-config means
            grads = torch.autograd.grad(loss, (weight, bias))
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            with torch.no_grad():
                for param, grad, buf, decay in zip((weight, bias), grads, momentum, (decays, 0.0), strict=True):
                    buf.mul_(0.9).add_(grad + decay * param)
                    param.sub_(scale * lrs.view(-1, 1, 1) * buf)
            step += 1
    return weight.detach(), bias.detach()


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    lrs: Iterable[float] = DEFAULT_LRS,
    weight_decays: Iterable[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 100,
    seed: int = 0,
) -> dict:
    """Best validation top-1 over the lr x weight-decay grid: {"top1", "lr", "weight_decay", "grid"}."""
    mean = train_feats.mean(dim=0)
    std = train_feats.std(dim=0).clamp_min(1e-6)
    x_train, x_val = (train_feats.float() - mean) / std, (val_feats.float() - mean) / std
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    pairs = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    lr_t = torch.tensor([lr for lr, _ in pairs])
    wd_t = torch.tensor([wd for _, wd in pairs]).view(-1, 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add sync cost (40x slower on a busy 2-core box)
    try:
        weight, bias = _train_linear_grid(x_train, train_labels, num_classes, lr_t, wd_t, epochs=epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    val_top1 = ((x_val @ weight + bias).argmax(dim=2) == val_labels).float().mean(dim=1)
    train_top1 = ((x_train @ weight + bias).argmax(dim=2) == train_labels).float().mean(dim=1)
    grid = [
        {"lr": lr, "weight_decay": wd, "top1": float(val_top1[i]), "train_top1": float(train_top1[i])}
        for i, (lr, wd) in enumerate(pairs)
    ]
    best = max(grid, key=lambda row: row["top1"])
    return {"top1": best["top1"], "lr": best["lr"], "weight_decay": best["weight_decay"], "grid": grid}


def resize_input(model: nn.Module, size: int) -> None:
    """Evaluate at another resolution: timm resamples the position embeddings (ViT) / rebuilds windows (Swin)."""
    patch = Backbone(model).patch
    if size <= 0 or size % patch:
        raise ValueError(f"--image-size {size} must be a positive multiple of the patch size {patch}")
    try:
        model.set_input_size(img_size=(size, size))
    except (AttributeError, AssertionError, RuntimeError) as err:
        raise ValueError(f"{type(model).__name__} cannot run at --image-size {size}: {err}; leave it out") from err


def _features_for(args: argparse.Namespace) -> tuple[tuple, tuple, int]:
    from mimscale.engine.safe_load import trust_decision
    from mimscale.eval.export import load_backbone
    from mimscale.pipeline.stream import iter_eval_batches

    loaded = load_backbone(args.model, args.set, trusted=trust_decision(args))
    size = args.image_size or loaded.image_size
    if size != loaded.image_size:
        resize_input(loaded.model, size)
    common = {"image_size": size, "batch_size": args.batch_size, "mean": loaded.mean, "std": loaded.std}
    features = {"pool": args.pool, "layer": args.layer}
    train = extract_features(loaded.model, iter_eval_batches(args.train, key="--train", **common), **features)
    val = extract_features(loaded.model, iter_eval_batches(args.val, key="--val", **common), **features)
    return train, val, size


def _result(args: argparse.Namespace, size: int, train_labels: torch.Tensor, val_labels: torch.Tensor) -> dict:
    return {
        "model": args.model,
        "protocol": args.protocol,
        "pool": args.pool,
        "layer": args.layer or "final",
        "image_size": size,
        "train_samples": len(train_labels),
        "val_samples": len(val_labels),
    }


def _print_result(args: argparse.Namespace, result: dict, settings: str) -> int:
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.protocol} top-1 {100 * result['top1']:.2f}% ({settings}, pool {args.pool}, layer {result['layer']}, "
            f"{result['image_size']}px, {result['train_samples']} train / {result['val_samples']} val) {args.model}"
        )
    return 0


def run_knn(args: argparse.Namespace) -> int:
    """`mimscale eval knn`: weighted kNN top-1 of frozen features."""
    torch.manual_seed(0)
    (train_feats, train_labels), (val_feats, val_labels), size = _features_for(args)
    result = _result(args, size, train_labels, val_labels)
    result["top1"] = knn_accuracy(
        train_feats, train_labels, val_feats, val_labels, k=args.k, temperature=args.temperature
    )
    result.update({"k": args.k, "temperature": args.temperature})
    return _print_result(args, result, f"k={args.k} T={args.temperature}")


def run_linear(args: argparse.Namespace) -> int:
    """`mimscale eval linear`: the best linear-probe top-1 of frozen features over the lr x weight-decay grid."""
    torch.manual_seed(0)
    (train_feats, train_labels), (val_feats, val_labels), size = _features_for(args)
    result = _result(args, size, train_labels, val_labels)
    result.update(linear_probe(train_feats, train_labels, val_feats, val_labels, epochs=args.epochs))
    return _print_result(args, result, f"lr={result['lr']} wd={result['weight_decay']}")
