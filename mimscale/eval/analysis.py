"""`mimscale analyze`: what did pretraining change inside the network? Attention, layer similarity, robustness.

Per layer and head (timm ViT): mean attention distance (how far, in pixels, a patch looks: local heads are
small, global ones large; MIM is known to keep more local heads than contrastive learning), attention entropy
(how spread the attention is) and head diversity (mean pairwise Jensen-Shannon divergence between the heads of a
layer; zero when every head attends alike). timm computes attention with fused SDPA, so the maps are recomputed
from each block's qkv projection on the attention module's input. Swin attends inside shifted windows, where a
distance is not comparable, so for Swin these are skipped with a note; CKA and occlusion work for every model.

Linear CKA between layers (Kornblith et al. 2019) shows which layers compute similar representations; occlusion
robustness compares pooled features of an intact image and the same image with a fraction of its patches blanked
(set to the dataset mean): their cosine, the cosine after removing the batch's mean feature (what every image
shares, e.g. a barely trained model's position signal, otherwise keeps the plain cosine near 1), and whether the
blanked image's nearest intact image is still its own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.engine.safe_load import add_trust_argument, trust_decision
from mimscale.eval.probe import pool_features
from mimscale.models.backbone import Backbone

DEFAULT_MASK_RATIOS = (0.0, 0.1, 0.25, 0.5, 0.75)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n examples ([n, d1], [n, d2]); 1 = same up to rotation+scale."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else 0.0


def _recompute_attention(
    attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + relative position biases) [B, H, N, N] from a timm attention module's input (what
    fused SDPA hides): ViT ``Attention`` (q/k norms) or Beit's (separate q/v biases, per-block and shared biases)."""
    batch, tokens, _ = x.shape
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # Beit: qkv Linear without bias, q and v biases kept apart (k has none)
        qkv = F.linear(x, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(x)
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + attn._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias
    return logits.softmax(dim=-1)


@torch.no_grad()
def vit_attention_and_features(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: attention maps [B, H, N, N] and block outputs [B, N, C] of a timm ViT or Beit."""
    maps: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    blocks = Backbone(model).blocks

    def record(module, args, kwargs):
        maps.append(_recompute_attention(module, args[0], kwargs.get("shared_rel_pos_bias")))

    hooks = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    hooks += [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in blocks]
    try:
        model.forward_features(images)
    finally:
        for handle in hooks:
            handle.remove()
    return maps, outputs


@torch.no_grad()
def block_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per block outputs: ViT [B, N, C]; Swin blocks of every stage [B, h, w, C] (NHWC)."""
    blocks = Backbone(model).blocks
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, args, out: outputs.append(out)) for block in blocks]
    try:
        model.forward_features(images)
    finally:
        for handle in hooks:
            handle.remove()
    return outputs


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """[N, N] Euclidean distance in pixels between the centres of the patches of a grid (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int, prefix: int) -> torch.Tensor:
    """[H] average pixel distance between a patch and the patches it attends to (attention among patches only,
    renormalised; averaged over queries and images), as in the ViT paper's Figure 7."""
    patches = attn[:, :, prefix:, prefix:].double()
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = patch_distances(grid, patch_size).to(patches.device)
    return (patches * distance).sum(dim=-1).mean(dim=(0, 2))


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """[H] mean entropy (nats) of each query's attention distribution; log(N) is uniform attention."""
    p = attn.double().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1).mean(dim=(0, 2))


def head_diversity(attn: torch.Tensor) -> float:
    """Mean Jensen-Shannon divergence (nats) between every pair of heads' attention, per query; 0 = heads alike."""
    heads = attn.shape[1]
    if heads < 2:
        return 0.0
    p = attn.double().clamp_min(1e-12)
    total = 0.0
    for i, j in itertools.combinations(range(heads), 2):
        mid = 0.5 * (p[:, i] + p[:, j])
        kl_i = (p[:, i] * (p[:, i] / mid).log()).sum(-1)
        kl_j = (p[:, j] * (p[:, j] / mid).log()).sum(-1)
        total += float((0.5 * (kl_i + kl_j)).mean())
    return total / (heads * (heads - 1) / 2)


def cka_matrix(features: list[torch.Tensor]) -> list[list[float]]:
    """Linear CKA between every pair of layers. Same token count: per token; otherwise per image (mean-pooled)."""
    same_shape = len({tuple(f.shape[:-1]) for f in features}) == 1
    flat = [f.reshape(-1, f.shape[-1]) if same_shape else f.flatten(1, -2).mean(dim=1) for f in features]
    size = len(flat)
    matrix = [[1.0] * size for _ in range(size)]
    for i, j in itertools.combinations(range(size), 2):
        matrix[i][j] = matrix[j][i] = linear_cka(flat[i], flat[j])
    return matrix


def cka_between(features_a: list[torch.Tensor], features_b: list[torch.Tensor]) -> list[list[float]]:
    """[len(a)][len(b)] linear CKA between the layers of two models on the same images (per token when every layer
    has the same token count, else per image, mean-pooled): how alike two models' representations are, layer by
    layer (Dark Secrets compares MIM and supervised models this way)."""
    features = [*features_a, *features_b]
    same_shape = len({tuple(f.shape[:-1]) for f in features}) == 1
    flat = [f.reshape(-1, f.shape[-1]) if same_shape else f.flatten(1, -2).mean(dim=1) for f in features]
    first, second = flat[: len(features_a)], flat[len(features_a) :]
    return [[linear_cka(x, y) for y in second] for x in first]


def occlusion_mask(images: torch.Tensor, ratio: float, cell: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, S, S] 1.0 where a randomly chosen ``ratio`` of the cell x cell squares is blanked (exact count)."""
    batch, _, height, width = images.shape
    grid_h, grid_w = height // cell, width // cell
    count = int(round(ratio * grid_h * grid_w))
    scores = torch.rand(batch, grid_h * grid_w, generator=generator)
    cells = torch.zeros(batch, grid_h * grid_w)
    cells.scatter_(1, scores.argsort(dim=1)[:, :count], 1.0)
    cells = cells.view(batch, 1, grid_h, grid_w)
    return cells.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)


@torch.no_grad()
def occlusion_scores(
    model: nn.Module, images: torch.Tensor, ratios=DEFAULT_MASK_RATIOS, *, cell: int, pool: str = "cls", seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per ``ratio`` of ``cell``-px squares blanked (set to 0, the dataset mean), three scores of pooled features:

    - ``cosine``: mean cosine similarity, blanked vs intact (the usual curve; a component every image shares, such
      as a barely trained model's position signal, keeps it near 1 whatever the content);
    - ``centred``: the same cosine after subtracting the intact batch's mean feature from both, so only what tells
      the images apart counts (random features score ~0 at heavy occlusion, not ~0.9);
    - ``retrieval``: the fraction of blanked images whose nearest intact image (centred cosine) is their own:
      whether the features still identify the image (1 / batch by chance).
    """
    intact = pool_features(model.forward_features(images), model, pool).float()
    centre = intact.mean(dim=0, keepdim=True)
    intact_centred = F.normalize(intact - centre, dim=1)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, dict[str, float]] = {"cosine": {}, "centred": {}, "retrieval": {}}
    for ratio in ratios:
        mask = occlusion_mask(images, ratio, cell, generator)
        masked = pool_features(model.forward_features(images * (1.0 - mask)), model, pool).float()
        masked_centred = F.normalize(masked - centre, dim=1)
        similarity = masked_centred @ intact_centred.T
        own = torch.arange(len(images))
        key = f"{ratio:g}"
        scores["cosine"][key] = float(F.cosine_similarity(masked, intact, dim=1).clamp(-1, 1).mean())
        scores["centred"][key] = float(similarity.diagonal().clamp(-1, 1).mean())
        scores["retrieval"][key] = float((similarity.argmax(dim=1) == own).float().mean())
    return scores


def occlusion_similarity(
    model: nn.Module, images: torch.Tensor, ratios=DEFAULT_MASK_RATIOS, *, cell: int, pool: str = "cls", seed: int = 0
) -> dict[str, float]:
    """{ratio: mean cosine similarity of pooled features, blanked vs intact} (``occlusion_scores``' first score)."""
    return occlusion_scores(model, images, ratios, cell=cell, pool=pool, seed=seed)["cosine"]


def analyze_model(model: nn.Module, images: torch.Tensor, *, ratios=DEFAULT_MASK_RATIOS, pool: str = "cls") -> dict:
    """Every metric of one model on one batch of images (normalised as the model expects)."""
    model = model.eval()
    images = images.to(dtype=next(model.parameters()).dtype)
    arch = Backbone(model)
    patch = arch.patch
    result: dict = {"family": arch.kind, "patch_size": patch}
    if arch.plain_attention:
        maps, features = vit_attention_and_features(model, images)
        grid = arch.grid()
        prefix = arch.num_prefix_tokens
        result["attention_distance"] = [mean_attention_distance(a, grid, patch, prefix).tolist() for a in maps]
        result["attention_entropy"] = [attention_entropy(a).tolist() for a in maps]
        result["head_diversity"] = [head_diversity(a) for a in maps]
        result["uniform_entropy"] = math.log(maps[0].shape[-1])
        result["uniform_attention_distance"] = float(patch_distances(grid, patch).mean())
    else:
        features = block_features(model, images)
        why = f"{type(model).__name__} blocks have no timm Attention to recompute the maps from"
        if arch.windowed_attention:
            why = "Swin attends within shifted windows (distances not comparable)"
        result["note"] = f"attention metrics skipped: {why}"
    result["cka"] = cka_matrix([f.float() for f in features])
    cell = max(patch, images.shape[-1] // 8)  # ViT: one patch; Swin (4-px patches): an 8 x 8 grid of cells
    result["occlusion_cell"] = cell
    scores = occlusion_scores(model, images, ratios, cell=cell, pool=pool)
    result["occlusion"] = scores["cosine"]
    result["occlusion_centred"], result["occlusion_retrieval"] = scores["centred"], scores["retrieval"]
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def plot_attention_distance(results: dict[str, dict], path: Path) -> None:
    """One panel per model: every head's mean attention distance per block (dots) and the layer mean (line)."""
    plt = _pyplot()
    vits = {label: r for label, r in results.items() if "attention_distance" in r}
    fig, axes = plt.subplots(1, len(vits), figsize=(5 * len(vits), 4.2), sharey=True, squeeze=False)
    for ax, (label, result) in zip(axes[0], vits.items(), strict=True):
        for layer, heads in enumerate(result["attention_distance"]):
            ax.scatter([layer + 1] * len(heads), heads, s=22, alpha=0.7, color="tab:blue")
        means = [sum(h) / len(h) for h in result["attention_distance"]]
        ax.plot(range(1, len(means) + 1), means, color="tab:red", lw=2, label="mean over heads")
        ax.axhline(result["uniform_attention_distance"], color="gray", ls="--", lw=1, label="uniform attention")
        ax.set(title=label, xlabel="block", xticks=range(1, len(means) + 1))
        ax.legend(loc="lower right", fontsize=9)
    axes[0][0].set_ylabel("mean attention distance (px)")
    fig.suptitle("How far each head looks (dots = heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention_summary(results: dict[str, dict], path: Path) -> None:
    """Entropy and head diversity per block, one line per model on shared axes."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, result in results.items():
        if "attention_entropy" not in result:
            continue
        entropy = [sum(h) / len(h) / result["uniform_entropy"] for h in result["attention_entropy"]]
        blocks = range(1, len(entropy) + 1)
        left.plot(blocks, entropy, marker="o", label=label)
        right.plot(blocks, result["head_diversity"], marker="o", label=label)
    left.axhline(1.0, color="gray", ls="--", lw=1, label="uniform attention")
    left.set(title="attention entropy / log(tokens)", xlabel="block", ylabel="1 = uniform, 0 = one token")
    left.ticklabel_format(axis="y", useOffset=False)
    right.set(title="head diversity (mean pairwise JS)", xlabel="block", ylabel="nats")
    left.legend(fontsize=9)
    right.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cka(results: dict[str, dict], path: Path) -> None:
    """Layer x layer linear CKA heatmaps, side by side, values written in the cells when they fit."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 4.4), squeeze=False)
    for ax, (label, result) in zip(axes[0], results.items(), strict=True):
        matrix = result["cka"]
        size = len(matrix)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
        ticks = list(range(size))
        ax.set(title=label, xlabel="block", ylabel="block", xticks=ticks, yticks=ticks)
        ax.set_xticklabels([t + 1 for t in ticks])
        ax.set_yticklabels([t + 1 for t in ticks])
        ax.grid(False)
        if size <= 8:  # more cells than that and the numbers overlap
            for i, j in itertools.product(range(size), range(size)):
                ax.text(
                    j,
                    i,
                    f"{matrix[i][j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if matrix[i][j] > 0.6 else "white",
                )
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label="linear CKA")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_occlusion(results: dict[str, dict], path: Path) -> None:
    """Feature similarity to the intact image as more of it is blanked, one line per model: the plain cosine and,
    where computed, the centred cosine (the batch's shared feature removed)."""
    plt = _pyplot()
    panels = [("occlusion", "cosine similarity to intact features")]
    if all("occlusion_centred" in result for result in results.values()):
        panels.append(("occlusion_centred", "centred cosine (batch mean removed)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for label, result in results.items():
            ratios = [float(r) for r in result[key]]
            ax.plot(ratios, list(result[key].values()), marker="o", label=label)
        ax.set(
            title="occlusion robustness",
            xlabel="fraction of the image blanked",
            ylabel=ylabel,
            ylim=(min(0.0, ax.get_ylim()[0]), 1.02),
        )
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(spec: str, taken: set[str]) -> str:
    path = Path(spec)
    generic = path.name in ("export", "checkpoints", "") or path.name.startswith("step_")
    base = (
        "random init" if spec.startswith("random:") else (f"{path.parent.name}/{path.name}" if generic else path.name)
    )
    label, count = base, 2
    while label in taken:
        label, count = f"{base} ({count})", count + 1
    taken.add(label)
    return label


def _first_images(pattern: str, loaded, count: int) -> torch.Tensor:
    from mimscale.pipeline.stream import iter_eval_batches

    batches = iter_eval_batches(
        pattern, image_size=loaded.image_size, batch_size=count, mean=loaded.mean, std=loaded.std, key="--images"
    )
    images, _ = next(iter(batches))
    return images[:count]


def run_analyze(args: argparse.Namespace) -> int:
    from mimscale.eval.export import load_backbone

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    taken: set[str] = set()
    trusted = trust_decision(args)
    for spec in [args.model, *args.compare]:
        loaded = load_backbone(spec, args.set if spec.startswith("random:") else (), trusted=trusted)
        label = _label(spec, taken)
        result = analyze_model(loaded.model, _first_images(args.images, loaded, args.num_images), pool=args.pool)
        results[label] = {"spec": spec, **result}
        print(f"{label}: {result.get('note') or 'attention, CKA and occlusion computed'}")
    (out / "analysis.json").write_text(json.dumps(results, indent=2) + "\n")
    written = ["analysis.json"]
    if any("attention_distance" in r for r in results.values()):
        plot_attention_distance(results, out / "attention_distance.png")
        plot_attention_summary(results, out / "attention_entropy_diversity.png")
        written += ["attention_distance.png", "attention_entropy_diversity.png"]
    plot_cka(results, out / "cka.png")
    plot_occlusion(results, out / "occlusion.png")
    written += ["cka.png", "occlusion.png"]
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="attention distance/entropy, CKA, occlusion robustness + plots")
    parser.add_argument("model", help="exported folder, run/checkpoint folder, or random:<config.yaml | run folder>")
    parser.add_argument("--compare", action="append", default=[], metavar="SPEC", help="more models, side by side")
    parser.add_argument("--images", required=True, help="shards to take the images from (labels unused)")
    parser.add_argument("--out", required=True, help="folder for analysis.json and the PNG plots")
    parser.add_argument("--num-images", type=int, default=32, help="images analysed per model")
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls", help="pooling for occlusion similarity")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for random:<config> models"
    )
    add_trust_argument(parser)
    parser.set_defaults(func=run_analyze)
