"""MAE against facebookresearch/mae's models_mae.py: the reference's random_masking (from a noise tensor),
forward_encoder, forward_decoder (ids_restore unshuffle), patchify, norm_pix_loss and forward_loss, and its
get_2d_sincos_pos_embed, are transcribed below and run on our modules' weights, images and the mask the same
noise gives; the losses and every gradient must agree within float tolerance. Then what every preset gets:
planner and FLOPs, activation checkpointing reaching the decoder, weight decay groups, export of the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimscale.config import ConfigError, load_config
from mimscale.methods import build_method

PATCH, SIZE, DECODER = 8, 32, {"width": 32, "depth": 2, "heads": 4}
MAE = [
    "method.name=mae",
    "model.student=vit_tiny_patch16_224",
    f"model.student_args={{patch_size: {PATCH}, depth: 2}}",
    f"data.image_size={SIZE}",
    "mask.ratio=0.75",
    "model.pos_embed_init=sincos_frozen",
    "method.decoder_args={width: 32, depth: 2, heads: 4}",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ the reference, transcribed (models_mae.py)
def ref_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def ref_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([ref_1d_sincos(embed_dim // 2, grid[0]), ref_1d_sincos(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0) if cls_token else emb


def ref_random_masking(x, mask_ratio, noise):
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def ref_patchify(imgs, p):
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))


def ref_loss(method, imgs, noise, mask_ratio=0.75):
    """forward_encoder + forward_decoder + forward_loss (norm_pix_loss=True), on our modules' weights and with the
    reference's own sin-cos tables."""
    vit, dec = method.student.backbone, method.head
    side = SIZE // PATCH
    pos_embed = torch.from_numpy(ref_2d_sincos(vit.pos_embed.shape[-1], side, cls_token=True)).float().unsqueeze(0)
    decoder_pos_embed = torch.from_numpy(ref_2d_sincos(dec.mask_token.shape[-1], side, cls_token=True)).float()
    # forward_encoder
    x = vit.patch_embed(imgs)
    x = x + pos_embed[:, 1:, :]
    x, mask, ids_restore = ref_random_masking(x, mask_ratio, noise)
    cls_token = vit.cls_token + pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x)
    # forward_decoder
    x = dec.decoder_embed(x)
    mask_tokens = dec.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + decoder_pos_embed.unsqueeze(0)
    for blk in dec.decoder_blocks:
        x = blk(x)
    pred = dec.decoder_pred(dec.decoder_norm(x))[:, 1:, :]
    # forward_loss
    target = ref_patchify(imgs, PATCH)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), mask


def mask_from_noise(noise: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
    """The [B, h, w] bool mask the reference's random_masking draws from ``noise`` (what our workers would give)."""
    length = noise.shape[1]
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.zeros_like(noise, dtype=torch.bool)
    mask.scatter_(1, ids_shuffle[:, len_keep:], True)
    side = int(length**0.5)
    return mask.view(-1, side, side)


def _build(extra=()):
    torch.manual_seed(0)
    cfg = load_config(None, [*MAE, *extra])
    return build_method(cfg).eval(), cfg


def _grads(method, loss):
    method.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ equality with the reference
def test_loss_and_gradients_equal_the_reference_on_the_same_noise():
    method, _ = _build()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, SIZE, SIZE, generator=generator)
    noise = torch.rand(3, (SIZE // PATCH) ** 2, generator=generator)
    reference, reference_mask = ref_loss(method, images, noise)
    reference_grads = _grads(method, reference)
    mask = mask_from_noise(noise)
    assert torch.equal(mask.flatten(1).float(), reference_mask)
    ours = method({"image": images, "mask": mask})
    torch.testing.assert_close(ours["loss"], reference, rtol=1e-5, atol=1e-6)
    grads = _grads(method, ours["loss"])
    assert set(grads) == set(reference_grads) and "head.mask_token" in grads and "student.backbone.cls_token" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the comparison can fail: another mask, or plain pixels instead of norm_pix_loss, gives another loss
    assert not torch.allclose(method({"image": images, "mask": mask_from_noise(noise.flip(1))})["loss"], reference)
    plain, _ = _build(["method.target_norm=none"])
    assert not torch.allclose(plain({"image": images, "mask": mask})["loss"], reference)


def test_position_tables_are_maes_and_fixed():
    method, cfg = _build()
    side = SIZE // PATCH
    encoder = torch.from_numpy(ref_2d_sincos(192, side, cls_token=True)).float()
    torch.testing.assert_close(method.student.backbone.pos_embed[0], encoder)
    decoder = torch.from_numpy(ref_2d_sincos(DECODER["width"], side, cls_token=True)).float()
    torch.testing.assert_close(method.head.decoder_pos_embed[0], decoder)
    assert not method.student.backbone.pos_embed.requires_grad
    assert "head.decoder_pos_embed" not in method.state_dict()  # a function of the grid, rebuilt on load
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert "student.mask_token" not in trainable  # the encoder never sees one; the decoder's is MAE's
    assert {"head.mask_token", "head.decoder_embed.weight", "head.decoder_pred.weight"} <= trainable


def test_initialisation_is_maes():
    method, _ = _build()
    vit, dec = method.student.backbone, method.head
    for name, module in [*vit.named_modules(), *dec.named_modules()]:
        if isinstance(module, torch.nn.Linear):
            bound = (6 / (module.in_features + module.out_features)) ** 0.5  # xavier_uniform
            assert module.weight.abs().max() <= bound and not module.bias.any(), name
    proj = vit.patch_embed.proj.weight
    assert proj.abs().max() <= (6 / (proj.shape[0] + proj[0].numel())) ** 0.5
    assert 0.01 < vit.cls_token.std() < 0.03 and 0.01 < dec.mask_token.std() < 0.03  # normal(0.02), not timm's 1e-6


def test_decoder_args_are_checked():
    with pytest.raises(ConfigError, match="method.decoder_args has keys"):
        _build(["method.decoder_args={width: 32, layers: 2}"])
    with pytest.raises(ConfigError, match="does not build an MAE decoder"):
        _build(["method.decoder_args={width: 30, heads: 4}"])
    with pytest.raises(ConfigError, match="mae drops masked tokens"):
        build_method(load_config(None, ["method.name=mae", "model.student=swin_tiny_patch4_window7_224"]))


def test_mae_overfits_one_batch():
    method, cfg = _build()
    method.train()
    from test_methods import _batch, _overfit

    batch = _batch(method, cfg)
    assert method.mask_kind == "random_tokens" and batch["mask"].sum() == 4 * 12
    losses = _overfit(method, batch, steps=8, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------ what the engine and planner read
def test_flops_count_the_encoder_on_a_quarter_and_the_decoder_on_every_token():
    from mimscale.engine.flops import build_on_meta, image_flops

    cfg = load_config(None, MAE)
    method = build_on_meta(cfg)
    assert [(f.name, f.trained) for f in method.counted_forwards(12)] == [("student", True), ("decoder", True)]
    flops = image_flops(method, cfg)
    tokens, kept, width, vit_width = 16 + 1, 4 + 1, DECODER["width"], 192  # class token included
    block = tokens * 24 * width**2 + 4 * tokens**2 * width  # qkv + proj + 4x MLP, plus QK^T and AV
    decoder = 2 * vit_width * width * kept + DECODER["depth"] * block + 2 * width * PATCH * PATCH * 3 * tokens
    assert flops.by_forward["decoder"] == decoder
    vit_block = kept * 24 * vit_width**2 + 4 * kept**2 * vit_width
    patch_embed = 2 * 16 * 3 * PATCH * PATCH * vit_width  # every patch is embedded, then 12 of 16 are dropped
    assert flops.by_forward["student"] == patch_embed + 2 * vit_block
    assert flops.total == 3 * (flops.by_forward["student"] + decoder)


def test_planner_checkpoints_and_casts_the_decoder_blocks_too():
    from mimscale.engine.flops import build_on_meta
    from mimscale.plan import make_plan, parse_memory, trace_student_activations

    cfg = load_config(None, MAE)
    method = build_on_meta(cfg)
    assert method.trained_blocks()[-DECODER["depth"] :] == list(method.head.decoder_blocks)
    trace = trace_student_activations(method, cfg, "bf16")
    assert len(trace.per_block) == 2 + DECODER["depth"] and all(trace.per_block)
    decoder_saved = sum(trace.per_block[2:])
    assert trace.stored(True) < trace.stored(False) - decoder_saved / 2  # the decoder's blocks are recomputed
    assert method.head.decoder_embed.weight.dtype == torch.bfloat16
    plain = make_plan(cfg, gpus=1, gpu_memory_bytes=parse_memory("80GB"))
    checkpointed = make_plan(
        load_config(None, [*MAE, "deepspeed.activation_checkpointing=true"]), gpus=1, gpu_memory_bytes=80e9
    )
    assert checkpointed.activation_bytes_per_sample < plain.activation_bytes_per_sample
    assert plain.no_grad_forwards == [] and plain.student_tokens == 5


def test_activation_checkpointing_recomputes_the_decoder_and_keeps_loss_and_grads():
    method, cfg = _build()
    from test_methods import _batch

    batch = _batch(method, cfg)
    calls = []
    method.head.decoder_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    plain_loss = method(batch)["loss"]
    plain = _grads(method, plain_loss)
    assert len(calls) == 1
    method.set_grad_checkpointing(True)
    loss = method(batch)["loss"]
    grads = _grads(method, loss)
    assert len(calls) == 3  # forward, then recomputed in backward
    torch.testing.assert_close(loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], msg=name)


def test_compile_reaches_the_decoder_blocks_and_keeps_the_loss():
    method, cfg = _build()
    from test_methods import _batch

    batch = _batch(method, cfg)
    with torch.no_grad():
        eager = method(batch)["loss"]
    assert method.compile_for_training(backend="eager") == 2 * (2 + DECODER["depth"])  # attn + mlp of every block
    assert "forward" in vars(method.head.decoder_blocks[-1].mlp)  # replaced by the compiled forward
    with torch.no_grad():
        torch.testing.assert_close(method(batch)["loss"], eager)


# ------------------------------------------------------------------ the real launcher, ZeRO-3, export
def test_demo_trains_under_zero3_with_checkpointing_on_two_ranks_and_exports_the_encoder(tmp_path):
    """demo_mae through the deepspeed launcher on 2 CPU ranks (ZeRO-3, bf16, activation checkpointing of encoder
    and decoder); the export holds the encoder alone and loads in plain timm with the trained weights."""
    import timm
    from test_train_e2e import REPO, ZERO3_BF16, launcher_cmd, ok, run_capped

    from mimscale.eval.export import export_checkpoint

    run_dir = tmp_path / "mae"
    settings = [
        f"run.output_dir={run_dir}",
        "run.device=cpu",
        "data.batch_size=2",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.log_every=1",
        "eval.knn_every=0",
        "checkpoint.every_steps=2",
        "deepspeed.activation_checkpointing=true",
        *ZERO3_BF16,
    ]
    command = launcher_cmd(2, *(arg for item in settings for arg in ("--set", item)))
    command[command.index(str(REPO / "configs" / "demo_cpu.yaml"))] = str(REPO / "configs" / "demo_mae.yaml")
    result = ok(run_capped(command))
    assert "step 2/2 | loss " in result.stdout
    out = export_checkpoint(run_dir, tmp_path / "export", with_head=True)
    exported = timm.create_model(f"local-dir:{out}", pretrained=True)
    from safetensors.torch import load_file

    trained = load_file(str(out / "mim_model.safetensors"))
    assert any(key.startswith("head.decoder_blocks.") for key in trained)  # the decoder trained and was saved
    assert not any("decoder" in key for key in exported.state_dict())  # ... but the export is the encoder alone
    from mimscale.models.students import mae_sincos_table

    table = torch.cat([torch.zeros(1, 192), mae_sincos_table(192, (8, 8))])
    exported_state = exported.state_dict()
    torch.testing.assert_close(exported_state.pop("pos_embed")[0], table)  # the fixed table (training held it in bf16)
    torch.testing.assert_close(trained["student.backbone.pos_embed"][0].float(), table, atol=1e-2, rtol=0)
    for name, tensor in exported_state.items():
        torch.testing.assert_close(tensor.float(), trained[f"student.backbone.{name}"].float(), msg=name)
