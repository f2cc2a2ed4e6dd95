"""Evaluation tools: export round trip from real DeepSpeed checkpoints, kNN / linear probe, analysis metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mimscale.cli import main as cli_main
from mimscale.eval.analysis import (
    _recompute_attention,
    attention_entropy,
    cka_between,
    cka_matrix,
    head_diversity,
    linear_cka,
    mean_attention_distance,
    occlusion_mask,
    occlusion_scores,
    occlusion_similarity,
)
from mimscale.eval.export import load_backbone
from mimscale.eval.probe import (
    extract_features,
    knn_accuracy,
    knn_top1,
    layer_features,
    linear_probe,
    resize_input,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
TINY_VIT = ["model.student_args.depth=2"]
TINY_SWIN = [
    "model.student=swin_tiny_patch4_window7_224",
    "model.student_args={embed_dim: 24, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 4}",
    "mask.patch_size=32",
]
TINY_SWINV2 = [
    "model.student=swinv2_tiny_window8_256",
    "model.student_args={embed_dim: 24, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 4}",
    "mask.patch_size=32",
]


def train_run(out: Path, family_args: list[str], zero_stage: int, precision: str) -> Path:
    """Two SimMIM steps through the real `mimscale train` (one process, DeepSpeed engine) -> run folder."""
    sets = [
        *family_args,
        f"run.output_dir={out}",
        f"deepspeed.zero_stage={zero_stage}",
        f"deepspeed.precision={precision}",
        "train.max_steps=2",
        "checkpoint.every_steps=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "eval.knn_every=0",
        "train.progress_bar=false",
    ]
    cmd = [sys.executable, "-m", "mimscale.cli", "train", "--config", str(DEMO)]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # keeps HOME: DeepSpeed's built-op cache
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def reference_backbone(tag_dir: Path) -> torch.nn.Module:
    """The trained student built by hand: timm model + fp32 weights merged by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = json.loads((tag_dir / "mimscale.json").read_text())
    cfg = meta["config"]
    model = timm.create_model(
        cfg["model"]["student"], num_classes=0, img_size=cfg["data"]["image_size"], **cfg["model"]["student_args"]
    )
    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    prefix = "student.backbone."
    missing, unexpected = model.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False
    )
    assert not unexpected and all(k not in dict(model.named_parameters()) for k in missing)
    return model.eval()


CASES = {
    "vit-zero2-bf16": (TINY_VIT, 2, "bf16"),
    "vit-zero3-fp32": (TINY_VIT, 3, "fp32"),
    "swin-zero2-fp32": (TINY_SWIN, 2, "fp32"),
    "swin-zero3-bf16": (TINY_SWIN, 3, "bf16"),
    "swinv2-zero1-bf16": (TINY_SWINV2, 1, "bf16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trip_is_bit_exact(case: str, tmp_path: Path) -> None:
    family_args, stage, precision = CASES[case]
    run = train_run(tmp_path / "run", family_args, stage, precision)
    out = tmp_path / "export"
    assert cli_main(["export", str(run), str(out), "--with-head"]) == 0

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # plain timm, no mimscale involved
    reference = reference_backbone(run / "checkpoints" / "step_00000002")
    assert loaded.num_classes == 0
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert set(got_state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert torch.equal(got_state[name], tensor), name
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(images))

    backbone_keys = set(load_file(out / "model.safetensors"))
    assert not any("mask_token" in k or k.startswith("head") for k in backbone_keys)
    full_keys = set(load_file(out / "mim_model.safetensors"))
    assert "student.mask_token" in full_keys and any(k.startswith("head.") for k in full_keys)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["num_classes"] == 0


@pytest.mark.slow
def test_zero0_bf16_export_uses_fp32_masters(tmp_path: Path, capsys) -> None:
    run = train_run(tmp_path / "run", TINY_VIT, 0, "bf16")
    out = tmp_path / "export"
    assert cli_main(["export", str(run / "checkpoints"), str(out), "--tag", "step_00000002"]) == 0
    exported = load_file(out / "model.safetensors")
    saved = torch.load(run / "checkpoints/step_00000002/mp_rank_00_model_states.pt", weights_only=False)["module"]
    weight = exported["blocks.0.attn.qkv.weight"]
    bf16_copy = saved["student.backbone.blocks.0.attn.qkv.weight"]
    assert weight.dtype == torch.float32
    assert torch.equal(weight.to(torch.bfloat16), bf16_copy)  # the bf16 weights are rounded fp32 masters ...
    assert not torch.equal(weight, bf16_copy.float())  # ... and the export kept the unrounded masters

    # evaluation reads the run folder and the exported folder as the same model
    from_run, from_export = load_backbone(str(run)), load_backbone(str(out))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_run.model(images), from_export.model(images))
    assert (from_run.image_size, from_run.mean) == (from_export.image_size, from_export.mean)
    args = ["--train", str(REPO / "shards/sample-val"), "--val", str(REPO / "shards/sample-val"), "--k", "1"]
    assert cli_main(["eval", "knn", "--model", str(out), "--json", *args]) == 0
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == 1.0
    )  # each image is its own neighbour


def test_zero0_bf16_export_of_a_frozen_sincos_table(tmp_path: Path) -> None:
    """The optimizer groups hold trainable parameters only: a requires_grad=False position table (MaskAlign's
    sincos_frozen) is not among the fp32 masters; export maps the groups without it and writes the exact table."""
    from mimscale.config import load_config
    from mimscale.engine.checkpoint import load_fp32_state
    from mimscale.models.students import build_student

    run = train_run(tmp_path / "run", [*TINY_VIT, "model.pos_embed_init=sincos_frozen"], 0, "bf16")
    tag_dir = run / "checkpoints" / "step_00000002"
    meta = json.loads((tag_dir / "mimscale.json").read_text())
    assert meta["frozen_params"] == ["student.backbone.pos_embed"]
    out = tmp_path / "export"
    assert cli_main(["export", str(run), str(out)]) == 0  # was "the fp32 optimizer groups do not match"

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    exact = build_student(load_config(DEMO, [*TINY_VIT, "model.pos_embed_init=sincos_frozen"])).backbone.pos_embed
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["module"]["student.backbone.pos_embed"].dtype == torch.bfloat16
    assert torch.equal(loaded.pos_embed, exact.detach())  # the fixed table in fp32, not its bf16 copy
    masters = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
    qkv = loaded.blocks[0].attn.qkv.weight
    assert any(torch.equal(qkv, m) for m in masters) and not torch.equal(qkv, qkv.bfloat16().float())

    # a checkpoint written before frozen_params was recorded: the config names the frozen table
    legacy = {k: v for k, v in meta.items() if k != "frozen_params"}
    (tag_dir / "mimscale.json").write_text(json.dumps(legacy))
    _, state = load_fp32_state(tag_dir)
    assert torch.equal(state["student.backbone.blocks.0.attn.qkv.weight"], qkv)
    (tag_dir / "mimscale.json").write_text(json.dumps({**meta, "frozen_params": "student.backbone.pos_embed"}))
    with pytest.raises(ValueError, match="frozen_params must be a list"):
        load_fp32_state(tag_dir)


def test_incomplete_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no complete mimscale checkpoint" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "checkpoints" / "step_00000004"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "mimscale.json is missing" in err
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out"), "--tag", "step_00000004"]) == 2
    assert "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def separable(n: int, classes: int, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    labels = torch.randint(0, classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def test_knn_and_linear_probe_separable_vs_random_labels() -> None:
    train_x, train_y = separable(400, 5, seed=0)
    val_x, val_y = separable(400, 5, seed=1)
    assert knn_accuracy(train_x, train_y, val_x, val_y) == 1.0
    assert linear_probe(train_x, train_y, val_x, val_y, epochs=30)["top1"] == 1.0
    noise_y = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(7))
    noise_val_y = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(8))
    assert knn_accuracy(train_x, noise_y, val_x, noise_val_y) < 0.3  # chance is 0.2
    probe = linear_probe(train_x, noise_y, val_x, noise_val_y, epochs=30)
    assert probe["top1"] < 0.3
    assert max(row["train_top1"] for row in probe["grid"]) > 0.3  # it did fit the training noise


def colour_batches(count: int, seed: int, *, random_labels: bool = False):
    """Images whose class is their dominant colour channel (trivially separable), 32 px."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (count,), generator=generator)
    images = torch.randn(count, 3, 32, 32, generator=generator) * 0.3
    images[torch.arange(count), labels] += 2.0
    if random_labels:
        labels = torch.randint(0, 3, (count,), generator=generator)
    return [(images[i : i + 16], labels[i : i + 16]) for i in range(0, count, 16)]


def test_knn_top1_on_a_real_vit_restores_mode_and_casts_dtype() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2)
    model = model.to(torch.bfloat16).train()
    top1 = knn_top1(model, colour_batches(48, 0), colour_batches(32, 1), k=5, temperature=0.07, pool="mean")
    assert top1 == 1.0
    assert model.training  # the monitor must not leave the student in eval mode
    chance = knn_top1(
        model.eval(), colour_batches(96, 0, random_labels=True), colour_batches(96, 1, random_labels=True)
    )
    assert chance < 0.6 and not model.training


def test_cka_identity_invariances_and_hand_value() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ rotation * 0.5, y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert linear_cka(x, y) < 0.5
    # one dimension: CKA is the squared correlation; x=(1,2,3), y=(1,0,2) have correlation 0.5
    assert linear_cka(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [2.0]])) == pytest.approx(0.25)


def test_cka_between_models_layer_by_layer() -> None:
    generator = torch.Generator().manual_seed(1)
    layers = [torch.randn(4, 9, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    turned = [2.5 * layer @ rotation for layer in layers]  # the same model, rotated and scaled
    cross = cka_between(layers, turned)
    assert len(cross) == 3 and all(len(row) == 3 for row in cross)
    for i in range(3):
        assert cross[i][i] == pytest.approx(1.0, abs=1e-12)
        for j in range(3):  # per token (36 rows), as cka_matrix does within one model
            assert cross[i][j] == pytest.approx(cka_matrix(layers)[i][j], abs=1e-12)
            assert cross[i][j] == pytest.approx(linear_cka(layers[i].reshape(36, 8), layers[j].reshape(36, 8)))
    assert max(cross[i][j] for i in range(3) for j in range(3) if i != j) < 0.9
    # different token counts: per image, mean-pooled over tokens
    pooled = cka_between(layers[:1], [torch.randn(4, 5, 6, generator=generator, dtype=torch.float64)])
    assert len(pooled) == 1 and 0.0 <= pooled[0][0] <= 1.0 + 1e-12


def test_attention_distance_entropy_diversity_by_hand() -> None:
    # 2x2 grid of 8-px patches plus one class token; uniform attention over the 4 patches
    uniform = torch.full((1, 1, 5, 5), 0.2)
    expected = (0 + 8 + 8 + 8 * math.sqrt(2)) / 4
    assert mean_attention_distance(uniform, (2, 2), 8, prefix=1).item() == pytest.approx(expected)
    identity = torch.eye(5).view(1, 1, 5, 5)
    assert mean_attention_distance(identity, (2, 2), 8, prefix=1).item() == 0.0
    assert attention_entropy(uniform).item() == pytest.approx(math.log(5))
    assert attention_entropy(identity).item() == pytest.approx(0.0, abs=1e-9)
    two_heads = torch.cat([identity, identity.roll(1, dims=-1)], dim=1)  # disjoint one-hot attention
    assert head_diversity(two_heads) == pytest.approx(math.log(2), abs=1e-9)
    assert head_diversity(torch.cat([uniform, uniform], dim=1)) == pytest.approx(0.0, abs=1e-12)


def test_recomputed_attention_equals_timm_unfused_attention() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1).eval()
    attn = model.blocks[0].attn
    attn.fused_attn = False  # timm's explicit softmax path; its attn_drop sees the attention matrix
    seen = {}
    attn.register_forward_pre_hook(lambda m, args: seen.update(ours=_recompute_attention(m, args[0])))
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.update(timm=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen["ours"].shape == (2, 3, 17, 17)
    torch.testing.assert_close(seen["ours"], seen["timm"], rtol=1e-5, atol=1e-6)


def test_occlusion_mask_counts_and_similarity_at_zero_is_one() -> None:
    images = torch.randn(4, 3, 32, 32)
    mask = occlusion_mask(images, 0.25, 8, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 1, 32, 32) and torch.equal(mask.sum(dim=(1, 2, 3)), torch.full((4,), 4.0 * 64))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2).eval()
    result = occlusion_similarity(model, images, (0.0, 0.5, 0.9), cell=8)
    assert result["0"] == pytest.approx(1.0, abs=1e-6)
    assert result["0.9"] < result["0"]


@pytest.mark.slow
def test_analyze_cli_writes_json_and_plots_for_vit_and_swin(tmp_path: Path) -> None:
    vit_cfg, swin_cfg = tmp_path / "vit.yaml", tmp_path / "swin.yaml"
    vit_cfg.write_text(f"base: {DEMO}\nmodel:\n  student_args: {{patch_size: 8, depth: 2}}\n")
    swin_cfg.write_text(
        f"base: {DEMO}\nmodel:\n  student: swin_tiny_patch4_window7_224\n  student_args: {{embed_dim: 24, "
        "depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 4}\nmask:\n  patch_size: 32\n"
    )
    out = tmp_path / "analysis"
    argv = ["analyze", f"random:{vit_cfg}", "--compare", f"random:{swin_cfg}", "--num-images", "8"]
    assert cli_main([*argv, "--images", str(REPO / "shards/sample-val"), "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    vit, swin = result["random init"], result["random init (2)"]
    assert len(vit["attention_distance"]) == 2 and len(vit["attention_distance"][0]) == 3  # 2 blocks x 3 heads
    assert len(vit["cka"]) == 2 and vit["cka"][0][0] == 1.0
    assert "attention_distance" not in swin and "Swin" in swin["note"] and len(swin["cka"]) == 4
    assert swin["occlusion"]["0"] == pytest.approx(1.0, abs=1e-6)
    for name in ("attention_distance.png", "attention_entropy_diversity.png", "cka.png", "occlusion.png"):
        assert (out / name).stat().st_size > 10_000


def test_unlabelled_samples_and_bad_image_size_are_clear_errors() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=1)
    unlabelled = [(torch.randn(4, 3, 32, 32), torch.tensor([0, -1, 1, -1]))]
    with pytest.raises(ValueError, match="2 of 4 samples have no .cls label"):
        extract_features(model, unlabelled)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        resize_input(model, 36)
    resize_input(model, 48)  # timm resamples the position embeddings: the model now takes 48 px
    assert extract_features(model, [(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]))], pool="mean")[0].shape == (
        2,
        192,
    )


def _vit_tokens_by_hand(model: torch.nn.Module, images: torch.Tensor, blocks: int) -> torch.Tensor:
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:blocks]:
        x = block(x)
    return x


@torch.no_grad()
def test_layer_features_pick_the_right_vit_block_and_swin_stage() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    second = layer_features(vit, images, 2)
    assert second.shape == (2, 1 + 16, 192)  # class token + 4x4 patches, as forward_features gives them
    assert torch.allclose(second, _vit_tokens_by_hand(vit, images, 2), atol=1e-5)
    assert torch.allclose(layer_features(vit, images, -2), second)
    assert torch.allclose(vit.norm(layer_features(vit, images, -1)), vit.forward_features(images), atol=1e-5)
    assert not torch.allclose(layer_features(vit, images, 1), second)
    for bad in (0, 4, -4):
        with pytest.raises(ValueError, match=f"--layer {bad} is out of range: VisionTransformer has 3"):
            layer_features(vit, images, bad)
    feats, _ = extract_features(vit, [(images, torch.tensor([0, 1]))], pool="mean", layer=2)
    assert torch.allclose(feats, second[:, 1:].mean(dim=1), atol=1e-6)

    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        img_size=64,
        embed_dim=24,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    assert layer_features(swin, x, 1).shape == (2, 16, 16, 24)  # stage 1, NHWC like forward_features
    assert torch.allclose(swin.norm(layer_features(swin, x, -1)), swin.forward_features(x), atol=1e-5)


def test_random_init_from_a_run_folder_takes_overrides(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"base: {DEMO}\nmodel:\n  student_args: {{patch_size: 8, depth: 2}}\n")
    assert len(load_backbone(f"random:{run}").model.blocks) == 2
    deeper = load_backbone(f"random:{run}", ["model.student_args.depth=3", "data.image_size=32"])
    assert len(deeper.model.blocks) == 3 and deeper.image_size == 32
    with pytest.raises(FileNotFoundError, match="has no config.yaml"):
        load_backbone(f"random:{tmp_path}")
    with pytest.raises(ValueError, match="only applies to random:<config> models"):
        load_backbone(str(run), ["model.student_args.depth=3"])


def test_eval_cli_probes_a_block_of_a_random_twin(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"base: {DEMO}\nmodel:\n  student_args: {{patch_size: 8, depth: 2}}\n")
    data = ["--train", str(REPO / "shards/sample-val"), "--val", str(REPO / "shards/sample-val"), "--json"]
    common = ["eval", "knn", "--model", f"random:{run}", "--set", "data.image_size=32", "--k", "1", *data]
    assert cli_main([*common, "--layer", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layer"] == 1 and result["image_size"] == 32 and result["train_samples"] == 128
    assert result["top1"] == 1.0  # val == train: each sample's nearest neighbour is itself
    assert cli_main([*common, "--layer", "3"]) == 2
    assert "--layer 3 is out of range: VisionTransformer has 2" in capsys.readouterr().err


def test_centred_occlusion_score_ignores_what_every_image_shares() -> None:
    """A feature every image shares (here a large constant added to each token) keeps the plain cosine near 1 at
    any occlusion; the centred cosine and the retrieval score see through it and fall as the blanking grows."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(16, 3, 32, 32)
    plain = occlusion_scores(model, images, (0.0, 0.75), cell=8, pool="mean")
    shared = torch.randn(model.embed_dim) * 50
    model.forward_features = lambda x, f=model.forward_features: f(x) + shared
    shifted = occlusion_scores(model, images, (0.0, 0.75), cell=8, pool="mean")
    assert shifted["cosine"]["0.75"] > 0.99 > plain["cosine"]["0.75"]
    assert shifted["centred"]["0"] == pytest.approx(1.0, abs=1e-5)
    assert shifted["retrieval"]["0"] == 1.0
    assert shifted["centred"]["0.75"] == pytest.approx(plain["centred"]["0.75"], abs=1e-3)
    assert shifted["centred"]["0.75"] < 0.9 and shifted["retrieval"]["0.75"] < 1.0
    # by hand: centred cosine and nearest-intact retrieval from the pooled features
    generator = torch.Generator().manual_seed(0)
    occlusion_mask(images, 0.0, 8, generator)
    mask = occlusion_mask(images, 0.75, 8, generator)
    with torch.no_grad():
        intact = model.forward_features(images)[:, 1:].mean(1)
        blanked = model.forward_features(images * (1 - mask))[:, 1:].mean(1)
    centre = intact.mean(0)
    cos = F.normalize(blanked - centre, dim=1) @ F.normalize(intact - centre, dim=1).T
    assert shifted["centred"]["0.75"] == pytest.approx(float(cos.diagonal().mean()), abs=1e-5)
    assert shifted["retrieval"]["0.75"] == pytest.approx(float((cos.argmax(1) == torch.arange(16)).float().mean()))
