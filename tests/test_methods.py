"""Methods end to end on tiny models: masked-only losses, overfitting one batch, the engine-facing contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimscale.config import ConfigError, load_config
from mimscale.methods import build_method
from mimscale.methods.components import infonce_loss, l1_loss, make_smooth_l1
from mimscale.pipeline.masking import mask_generator_for

TINY_VIT = ["model.student=vit_tiny_patch16_224", "model.student_args={patch_size: 8, depth: 2}", "data.image_size=32"]
SIMMIM = TINY_VIT + ["method.name=simmim", "mask.patch_size=16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(method, cfg, size: int = 4, seed: int = 0) -> dict:
    gen = mask_generator_for(cfg, method)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    side = cfg.data.image_size
    return {
        "image": torch.nn.functional.interpolate(torch.randn(size, 3, 4, 4), size=side, mode="bilinear"),
        "mask": torch.from_numpy(np.stack([gen(rng) for _ in range(size)])),
        "label": torch.zeros(size, dtype=torch.long),
        "sample_id": [str(i) for i in range(size)],
    }


def _build(overrides):
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    return build_method(cfg), cfg


def _overfit(method, batch, steps: int = 6, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = method(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


def test_simmim_contract_and_state_dict_layout():
    method, cfg = _build(SIMMIM)
    assert method.mask_kind == "random_cells" and method.token_stride == 8
    assert method.frozen_modules() == []
    keys = set(method.state_dict())
    assert "student.mask_token" in keys and "head.proj.weight" in keys
    assert all(k.startswith(("student.backbone.", "student.mask_token", "head.")) for k in keys)
    out = method(_batch(method, cfg))
    assert out["loss"].dtype == torch.float32 and out["loss"].ndim == 0
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


def _head_output_grad(method, batch) -> torch.Tensor:
    """Gradient of the loss with respect to the head's output, after one forward and backward."""
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["out"] = out

    handle = method.head.register_forward_hook(keep)
    method(batch)["loss"].backward()
    handle.remove()
    return captured["out"].grad


def test_simmim_loss_only_touches_masked_pixels():
    method, cfg = _build(SIMMIM)
    batch = _batch(method, cfg)
    grad = _head_output_grad(method, batch).abs().sum(1)  # [B, H, W]
    pixel_mask = batch["mask"].repeat_interleave(8, 1).repeat_interleave(8, 2)
    assert torch.all(grad[~pixel_mask] == 0)
    assert torch.all(grad[pixel_mask] > 0)


def test_simmim_loss_is_normalised_like_simmim():
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = torch.rand(2, 1, 8, 8) > 0.5
    reference = ((pred - target).abs() * mask).sum() / (mask.sum() + 1e-5) / 3
    ours = l1_loss(pred.permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), mask[:, 0])
    torch.testing.assert_close(ours, reference)


def test_simmim_overfits_one_batch():
    method, cfg = _build(SIMMIM)
    losses = _overfit(method, _batch(method, cfg), steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_simmim_patch_pixel_target_and_grad_checkpointing_train():
    method, cfg = _build(SIMMIM + ["method.target_norm=patch_pixel"])
    method.set_grad_checkpointing(True)
    batch = _batch(method, cfg)
    out = method(batch)
    out["loss"].backward()
    assert method.student.mask_token.grad is not None and torch.isfinite(out["loss"])


def test_retired_method_head_key_loads_at_its_old_default_only():
    from mimscale.config import from_dict

    stored = load_config(None, SIMMIM).to_dict()
    stored["method"]["head"] = "auto"  # what checkpoints written before the key went store
    assert from_dict(stored).method == load_config(None, SIMMIM).method
    stored["method"]["head"] = "pixelshuffle"
    with pytest.raises(ConfigError, match="method.head.*was removed"):
        from_dict(stored)


def test_smooth_l1_and_infonce_match_reference():
    pred, target = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    torch.testing.assert_close(
        make_smooth_l1(0.5)(pred, target), torch.nn.functional.smooth_l1_loss(pred, target, beta=0.5)
    )
    query, key = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    q = query / query.norm(dim=-1, keepdim=True)
    k = key / key.norm(dim=-1, keepdim=True)
    expected = 0.0
    for g in range(2):
        for i in range(6):
            logits = (q[g, i] @ k[g].T) / 0.1
            expected += -(logits[i] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(infonce_loss(query, key, temperature=0.1), expected / 12)


TINY_CLIP = (
    "teacher.model_args={embed_dim: 32, vision_cfg: {image_size: 32, layers: 3, width: 64, patch_size: 8, "
    "head_width: 32}, text_cfg: {context_length: 8, vocab_size: 64, width: 32, heads: 2, layers: 1}}"
)
CLIP_TEACHER = ["teacher.kind=open_clip", "teacher.name=ViT-B-16", "teacher.random_init=true", TINY_CLIP]
MASKDISTILL = TINY_VIT + CLIP_TEACHER + ["method.name=maskdistill", "mask.patch_size=16", "mask.ratio=0.4"]
MASKALIGN = TINY_VIT + CLIP_TEACHER + ["method.name=maskalign", "mask.patch_size=16", "mask.ratio=0.7"]
MASKALIGN += ["teacher.layers=[-2, -1]"]
RELAXMIM = TINY_VIT + ["method.name=relaxmim", "mask.patch_size=16", "mask.ratio=0.75"]
PATCH_NCE = TINY_VIT + ["method.name=patch_content_nce", "mask.patch_size=16", "mask.ratio=0.75"]


@pytest.mark.parametrize("overrides", [MASKDISTILL, MASKALIGN], ids=["maskdistill", "maskalign"])
def test_teacher_is_frozen_unregistered_and_unchanged_by_training(overrides):
    method, cfg = _build(overrides)
    (teacher,) = method.frozen_modules()
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in method.parameters()}
    assert not any(k.startswith(("teacher", "_frozen")) for k in method.state_dict())
    assert all(k.startswith(("student.", "head.")) for k in method.state_dict())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # method.train() never reaches it (not a submodule); asked directly, it must stay in eval
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    losses = _overfit(method, _batch(method, cfg), steps=3)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert np.isfinite(losses).all()


@pytest.mark.parametrize(
    "overrides,kind",
    [
        (MASKDISTILL, "blockwise"),
        (MASKALIGN, "random_tokens"),
        (RELAXMIM, "random_tokens"),
        (PATCH_NCE, "random_tokens"),
    ],
    ids=["maskdistill", "maskalign", "relaxmim", "patch_content_nce"],
)
def test_feature_methods_overfit_one_batch(overrides, kind):
    method, cfg = _build(overrides)
    assert method.mask_kind == kind
    lr = 3e-4 if cfg.method.name in ("relaxmim", "patch_content_nce") else 2e-3  # the InfoNCE target moves
    losses = _overfit(method, _batch(method, cfg), steps=8, lr=lr)
    assert losses[-1] < 0.9 * losses[0], losses


def test_maskdistill_loss_only_on_masked_tokens():
    method, cfg = _build(MASKDISTILL)
    batch = _batch(method, cfg)
    grad = _head_output_grad(method, batch).abs().sum(-1)  # [B, h, w]
    assert torch.all(grad[~batch["mask"]] == 0) and torch.all(grad[batch["mask"]] > 0)


def test_maskalign_attention_guided_mask_keeps_attended_tokens():
    from mimscale.methods.maskalign import attention_guided_mask

    attention = torch.full((2, 4, 4), 1e-6)
    attention[:, 0, :] = 1.0  # the first row holds all the attention
    mask = attention_guided_mask(attention, num_masked=12)
    assert mask.sum().item() == 24 and not mask[:, 0, :].any()
    method, cfg = _build(MASKALIGN + ["mask.kind=attention_guided"])
    assert method.mask_kind == "random_tokens"  # the loader's mask is replaced inside the method
    out = method(_batch(method, cfg))
    kept = int(16 * (1 - cfg.mask.ratio))  # MaskAlign's len_keep
    assert torch.isfinite(out["loss"]) and abs(out["mask_ratio"].item() - (16 - kept) / 16) < 1e-6


def test_teacher_grid_is_resampled_to_the_student_grid():
    overrides = MASKDISTILL + ["teacher.image_size=48"]  # 6x6 teacher tokens vs 4x4 student tokens
    method, cfg = _build(overrides)
    assert method.frozen_modules()[0].grid == (6, 6)
    out = method(_batch(method, cfg))
    assert torch.isfinite(out["loss"])


def test_timm_teacher_works_for_maskdistill():
    overrides = TINY_VIT + ["method.name=maskdistill", "mask.patch_size=16", "teacher.kind=timm"]
    overrides += ["teacher.name=vit_tiny_patch16_224", "teacher.random_init=true", "teacher.model_args={depth: 2}"]
    method, cfg = _build(overrides)
    assert method.frozen_modules()[0].image_size == 224
    assert torch.isfinite(method(_batch(method, cfg))["loss"])


def test_patch_content_nce_target_is_stop_grad_and_accuracy_is_the_match_rate():
    from mimscale.models.students import gather_tokens, keep_indices

    method, cfg = _build(PATCH_NCE)
    method.eval()  # no drop path: the hand-made forwards below see the same network
    batch = _batch(method, cfg)
    out = method(batch)
    out["loss"].backward()
    params = dict(method.named_parameters())
    got = {name: p.grad.clone() for name, p in params.items()}

    def by_hand(stop_grad: bool):
        method.zero_grad()
        mask = batch["mask"].bool()
        index = keep_indices(~mask)
        # keys: each masked patch's own patch embedding (no position, no context); candidates: the whole batch
        content = method.student.backbone.patch_embed(batch["image"])
        keys = method.head(gather_tokens(content, index)).flatten(0, 1)[None]
        queries = method.head(gather_tokens(method.student(batch["image"], mask).tokens, index)).flatten(0, 1)[None]
        infonce_loss(queries, keys.detach() if stop_grad else keys, temperature=0.2).backward()
        return queries, keys, {name: p.grad.clone() for name, p in params.items()}

    queries, keys, expected = by_hand(stop_grad=True)
    for name in params:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    _, _, without_stop_grad = by_hand(stop_grad=False)
    assert any(not torch.allclose(got[n], without_stop_grad[n]) for n in params)
    similarity = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).mT
    rate = (similarity.argmax(-1) == torch.arange(similarity.shape[-1])).float().mean().item()
    assert out["match_accuracy"].item() == pytest.approx(rate)


REGRESSION_LOSSES = ["l1", "smooth_l1", "mse", "cosine"]
REGISTRY_CASES = [
    (name, overrides, loss, norm)
    for name, overrides, norms in [
        ("simmim", SIMMIM, ["none", "patch_pixel"]),
        ("maskdistill", MASKDISTILL, ["none", "layernorm"]),
        ("maskalign", MASKALIGN, ["none", "layernorm"]),
    ]
    for loss in REGRESSION_LOSSES
    for norm in norms
] + [("relaxmim", RELAXMIM, "infonce", "none"), ("patch_content_nce", PATCH_NCE, "infonce", "none")]


@pytest.mark.parametrize(
    "name, overrides, loss, norm", REGISTRY_CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in REGISTRY_CASES]
)
def test_loss_and_target_norm_overrides_are_used(name, overrides, loss, norm):
    """Every combination that fits: the named loss and norm are the ones the method computes with."""
    from mimscale.methods.components import LOSSES, TARGET_NORMS

    method, cfg = _build(overrides + [f"method.loss={loss}", f"method.target_norm={norm}"])
    batch = _batch(method, cfg)
    out = method(batch)
    assert torch.isfinite(out["loss"])
    pred, target, weight = torch.randn(2, 5, 8), torch.randn(2, 5, 8), (torch.rand(2, 5) > 0.5).float()
    args = (pred, target) if loss == "infonce" else (pred, target, weight)
    torch.testing.assert_close(method.loss_fn(*args), LOSSES[loss].build()(*args))  # the named loss, not another
    if hasattr(method, "target_norm"):
        target = torch.randn(2, 3, 16, 16)
        expected = TARGET_NORMS[norm].build(method.student.patch_size)(target)
        torch.testing.assert_close(method.target_norm(target), expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (SIMMIM + ["method.loss=infonce"], "method.loss='infonce' is not a regression loss"),
        (SIMMIM + ["method.target_norm=layernorm"], "method.target_norm='layernorm' does not apply to pixel"),
        (MASKDISTILL + ["method.target_norm=patch_pixel"], "does not apply to feature targets"),
        (MASKALIGN + ["method.loss=infonce"], "not a regression loss"),
        (RELAXMIM + ["method.loss=mse"], "method.loss='mse' is not a contrastive loss"),
        (RELAXMIM + ["method.target_norm=layernorm"], "method.target_norm='layernorm' is not valid for relaxmim"),
        (PATCH_NCE + ["method.target_norm=layernorm"], "'layernorm' is not valid for patch_content_nce"),
        (SIMMIM + ["method.loss=l2"], "choose auto or one of l1, mse, smooth_l1, cosine"),
        (SIMMIM + ["method.loss_args={beta: 2}"], "loss_args has keys"),
    ],
)
def test_overrides_that_do_not_fit_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _build(overrides)


def test_cosine_and_mse_losses_and_an_eva_style_override():
    from mimscale.methods.components import cosine_loss, mse_loss

    x = torch.randn(2, 5, 8)
    weight = torch.zeros(2, 5)
    weight[:, :2] = 1
    assert cosine_loss(x, 3 * x).abs().item() < 1e-6
    assert abs(cosine_loss(x, -x).item() - 2.0) < 1e-5
    target = x.clone()
    target[:, 2:] += 10  # only unweighted positions differ
    assert mse_loss(x, target, weight).item() < 1e-9 and mse_loss(x, target).item() > 1
    method, cfg = _build(MASKDISTILL + ["method.loss=cosine", "method.target_norm=none"])
    assert torch.isfinite(method(_batch(method, cfg))["loss"])
    with pytest.raises(ConfigError, match="method.loss"):
        _build(MASKDISTILL + ["method.loss=infonce"])


def test_maskalign_aligns_class_token_and_visible_tokens_only():
    method, cfg = _build(MASKALIGN)
    batch = _batch(method, cfg)
    shapes = []
    method.head.register_forward_hook(lambda module, args, out: shapes.extend(p.shape for p in out))
    method(batch)
    visible = int((~batch["mask"][0]).sum())
    assert shapes == [(4, 1 + visible, 64)] * 2  # two teacher levels, CLIP width 64


def test_simmim_swin_reconstructs_through_pixelshuffle_and_learns():
    overrides = [
        "model.student=swin_tiny_patch4_window7_224",
        "model.student_args={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1], window_size: 2}",
        "data.image_size=64",
        "mask.patch_size=32",
        "method.name=simmim",
    ]
    method, cfg = _build(overrides)
    assert type(method.head).__name__ == "PixelShuffleHead" and method.token_stride == 4
    batch = _batch(method, cfg)
    assert batch["mask"].shape == (4, 16, 16)
    losses = _overfit(method, batch, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("overrides", [SIMMIM, MASKALIGN], ids=["simmim", "maskalign"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(overrides):
    method, cfg = _build(overrides)
    method.eval()  # no drop path, so both passes see the same network
    batch = _batch(method, cfg)

    def loss_and_grads():
        method.zero_grad()
        loss = method(batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in method.parameters() if p.grad is not None]

    plain_loss, plain_grads = loss_and_grads()
    method.set_grad_checkpointing(True)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert len(ckpt_grads) == len(plain_grads)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_relaxmim_compares_the_masked_view_with_the_stop_grad_full_view_across_images():
    """By hand: pooled masked view vs pooled full view (no gradient) of the same image, the other images of the batch
    as negatives, one shared projector; the same loss and gradients as the method's."""
    method, cfg = _build(RELAXMIM)
    method.eval()
    batch = _batch(method, cfg)
    out = method(batch)
    params = dict(method.named_parameters())
    method.zero_grad()
    out["loss"].backward()
    got = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    method.zero_grad()
    image, mask = batch["image"], batch["mask"].bool()
    with torch.no_grad():
        full = method.student.backbone.forward_features(image)[:, 1:].mean(1)  # plain timm forward, unmasked
    masked = method.student(image, mask).tokens.mean(1)
    keys = method.head(full).detach()  # the whole target branch, projector included, is stop-grad
    loss = infonce_loss(method.head(masked)[None], keys[None], temperature=0.2)
    torch.testing.assert_close(out["loss"], loss)
    loss.backward()
    assert set(got) == {n for n, p in params.items() if p.grad is not None} and "student.mask_token" in got
    for name, grad in got.items():
        torch.testing.assert_close(grad, params[name].grad, msg=name)
    assert out["match_chance"].item() == pytest.approx(1 / 4)  # four images, one positive each
