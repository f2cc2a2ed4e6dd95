"""Frozen teachers: an open_clip vision tower or a timm ViT whose patch tokens are the distillation targets.

A teacher is locked: every parameter has ``requires_grad=False``, ``train()`` keeps it in eval mode and the
forward runs under ``torch.no_grad()``. It is not a submodule of the method, so it never reaches the optimizer,
ZeRO or a checkpoint; the engine moves/casts it on its own, and the teacher moves its inputs to wherever its
weights are (and in their dtype), so it works whatever happened to the trainable part.

Weights are never downloaded silently and never random unless ``teacher.random_init`` says so: a pretrained tag
is looked up in the local cache first and, when it is absent and the hub is offline or unreachable, building
fails at once with a message asking for a local weights file.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from mimscale.config import ConfigError, DataConfig, TeacherConfig
from mimscale.models.backbone import Backbone, find_family
from mimscale.models.teacher_kinds import TEACHER_KINDS

OUTPUTS = ("block", "norm", "projected")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


@dataclass
class TeacherOutput:
    """``levels``: [B, h, w, C] token maps, one per requested block; ``class_tokens``: the matching [B, C] class
    tokens. ``cls_attention``: [B, h, w] attention of the class token to each patch in the last block (heads
    averaged), when asked for."""

    levels: list[torch.Tensor]
    class_tokens: list[torch.Tensor]
    cls_attention: torch.Tensor | None = None


def resize_token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a [B, h, w, C] (or [B, h, w]) token map to ``grid`` (e.g. CLIP-L/14 16x16 -> ViT/16 14x14)."""
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens
    squeeze = tokens.ndim == 3
    x = tokens.unsqueeze(-1) if squeeze else tokens
    x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=grid, mode="bilinear", align_corners=False)
    x = x.permute(0, 2, 3, 1).to(tokens.dtype)
    return x[..., 0] if squeeze else x


class FrozenTeacher(nn.Module):
    """Shared frozen-teacher logic; subclasses say how to embed, which blocks to run and how to finish."""

    def __init__(
        self, tower: nn.Module, layers: list[int], output: str, image_size: int, data_norm: tuple, teacher_norm: tuple
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ConfigError(f"teacher.output={output!r} is not valid; choose auto or one of {', '.join(OUTPUTS)}")
        self.tower = tower
        self.output = output
        self.image_size = image_size
        self.data_mean, self.data_std = (tuple(float(v) for v in t) for t in data_norm)
        self.teacher_mean, self.teacher_std = (tuple(float(v) for v in t) for t in teacher_norm)
        self.depth = len(self.blocks())
        for layer in layers:
            if not -self.depth <= layer < self.depth:
                raise ConfigError(f"teacher.layers has {layer}, but the teacher has {self.depth} blocks")
        self.layers = [layer % self.depth for layer in layers]
        self.requires_grad_(False)
        self.eval()

    # ----------------------------------------------------------------- what subclasses provide
    patch_size: int
    width: int

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cls_attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    num_prefix_tokens: int = 1

    # ----------------------------------------------------------------- shared behaviour
    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval: dropout/drop path off and norms fixed, whatever the engine asks of the method."""
        return super().train(False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the loader's normalisation, apply the teacher's, resize, and move to the teacher's device/dtype."""
        weight = next(self.parameters())
        x = image.to(device=weight.device, dtype=torch.float32)
        if (self.data_mean, self.data_std) != (self.teacher_mean, self.teacher_std):
            data_mean, data_std, mean, std = self._norm_constants(x.device)
            x = ((x * data_std + data_mean) - mean) / std
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return x.to(weight.dtype)

    def _norm_constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(data mean, data std, teacher mean, teacher std) as [1, C, 1, 1] float32 on ``device``, made once per
        device: creating them every step would be four blocking host-to-device copies per step."""
        cache = self.__dict__.setdefault("_norm_cache", {})
        if device not in cache:
            values = (self.data_mean, self.data_std, self.teacher_mean, self.teacher_std)
            cache[device] = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in values)
        return cache[device]

    @torch.no_grad()
    def forward(self, image: torch.Tensor, *, need_cls_attention: bool = False) -> TeacherOutput:
        x = self.embed(self.prepare(image))
        wanted = set(self.layers)
        outputs: dict[int, torch.Tensor] = {}
        attention = None
        last = max(wanted)
        for i, block in enumerate(self.blocks()):
            if need_cls_attention and i == self.depth - 1:
                attention = self.cls_attention(block, x)
            x = block(x)
            if i in wanted:
                outputs[i] = x
            if i >= last and not need_cls_attention:
                break
        batch, (h, w) = image.shape[0], self.grid
        finished = [self.finish(outputs[i]) for i in self.layers]
        levels = [x[:, self.num_prefix_tokens :].reshape(batch, h, w, -1) for x in finished]
        if attention is not None:
            attention = attention.reshape(batch, h, w)
        return TeacherOutput(levels=levels, class_tokens=[x[:, 0] for x in finished], cls_attention=attention)

    @property
    def out_dim(self) -> int:
        return self.width


def _mha_cls_attention(attn: nn.Module, normed: torch.Tensor, prefix: int) -> torch.Tensor:
    """Class-token attention to the patches, heads averaged, from an nn.MultiheadAttention (batch first)."""
    _, weights = attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
    return weights[:, 0, prefix:].float()


class OpenClipTeacher(FrozenTeacher):
    """The vision tower of an open_clip CLIP model (open_clip.transformer.VisionTransformer)."""

    def __init__(self, visual: nn.Module, cfg: TeacherConfig, output: str, data: DataConfig):
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        if not all(hasattr(visual, name) for name in ("conv1", "positional_embedding", "transformer", "ln_post")):
            raise ConfigError(
                f"teacher.name={cfg.name!r} has a {type(visual).__name__} vision tower; only open_clip's own "
                "ViT towers are supported (for timm-backed towers use teacher.kind: timm)"
            )
        self.patch_size = int(visual.patch_size[0])
        self.width = int(visual.conv1.out_channels)
        native = int(visual.image_size[0])
        size = cfg.image_size or native
        if size % self.patch_size:
            raise ConfigError(f"teacher.image_size={size} is not a multiple of the teacher patch {self.patch_size}")
        if size != native:
            _resample_open_clip_pos_embed(visual, size // self.patch_size)
        mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        super().__init__(visual, list(cfg.layers), output, size, (data.mean, data.std), (mean, std))
        if output == "projected" and visual.proj is None:
            raise ConfigError(f"teacher.output=projected but {cfg.name} has no projection; use teacher.output: norm")

    def blocks(self) -> nn.ModuleList:
        return self.tower.transformer.resblocks

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        x = self.tower._embeds(image)
        if not self.tower.transformer.batch_first:
            raise ConfigError("this open_clip tower runs sequence-first; mimscale needs batch_first towers")
        return x

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.output == "block":
            return tokens
        tokens = self.tower.ln_post(tokens)
        return tokens @ self.tower.proj if self.output == "projected" else tokens

    def cls_attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            raise ConfigError("teacher class-token attention needs nn.MultiheadAttention blocks (standard CLIP ViT)")
        return _mha_cls_attention(block.attn, block.ln_1(x), self.num_prefix_tokens)

    @property
    def out_dim(self) -> int:
        return int(self.tower.proj.shape[1]) if self.output == "projected" else self.width


class TimmTeacher(FrozenTeacher):
    """A timm VisionTransformer (e.g. vit_base_patch16_clip_224.openai, a DINOv2 or an EVA-style ViT)."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig, output: str, data: DataConfig):
        family = find_family(model)
        if family is None or family.name != "vit":  # embed() runs the ViT family's own embedding steps
            raise ConfigError(f"teacher.name={cfg.name!r} is not a timm VisionTransformer; pick a timm ViT")
        if output == "projected":
            raise ConfigError("teacher.output=projected is for open_clip teachers; use norm or block for timm")
        arch = Backbone(model)
        self.patch_size = arch.patch_size[0]
        self.width = int(model.embed_dim)
        self.num_prefix_tokens = arch.num_prefix_tokens
        size = arch.image_size
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        norm = (pcfg.get("mean", data.mean), pcfg.get("std", data.std))
        super().__init__(model, list(cfg.layers), output, size, (data.mean, data.std), norm)

    def blocks(self) -> nn.ModuleList:
        return self.tower.blocks

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        model = self.tower
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image))))

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.norm(tokens) if self.output == "norm" else tokens

    def cls_attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        if not all(hasattr(attn, name) for name in ("qkv", "num_heads", "scale")):
            raise ConfigError("teacher class-token attention needs timm Attention blocks with a fused qkv")
        batch, length, width = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # [B, heads, 1, L]
        return weights.mean(1)[:, 0, self.num_prefix_tokens :].float()


def _resample_open_clip_pos_embed(visual: nn.Module, grid: int) -> None:
    """Run a CLIP tower at another resolution: resample its position embedding once, at build time."""
    from timm.layers import resample_abs_pos_embed

    pos = visual.positional_embedding.data
    new = resample_abs_pos_embed(pos.unsqueeze(0), new_size=(grid, grid), num_prefix_tokens=1)[0]
    visual.positional_embedding = nn.Parameter(new, requires_grad=False)
    visual.grid_size = (grid, grid)
    visual.image_size = (grid * visual.patch_size[0],) * 2


# ------------------------------------------------------------------------------------------- loading


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(("~", ".")) or text.lower().endswith(WEIGHT_SUFFIXES)


def _hub_offline_reason(url: str) -> str | None:
    """Why a download cannot work right now (None when the host answers within 3 s)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(url).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"{host} is unreachable ({err.__class__.__name__})"
    return None


def _no_weights_error(what: str, reason: str) -> ConfigError:
    return ConfigError(
        f"{what} is not in the local cache and cannot be downloaded ({reason}). Download the weights on a machine "
        "with network access and set teacher.pretrained to the local file (e.g. /models/open_clip_pytorch_model.bin); "
        "teacher.random_init: true builds a random teacher for tests only"
    )


def _checked_local_file(cfg: TeacherConfig) -> str:
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"teacher.pretrained={cfg.pretrained!r}: no such weights file; point it at an existing local file "
            "(open_clip .bin/.pt/.safetensors or a timm checkpoint) or use an open_clip pretrained tag"
        )
    return str(path)


def _cached_open_clip_weights(name: str, tag: str) -> tuple[str | None, dict]:
    """The open_clip tag's weights file if already in the local cache (HF hub cache or ~/.cache/clip)."""
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(
            f"teacher.pretrained={tag!r} is not an open_clip tag for {name}; known tags: {', '.join(tags) or 'none'} "
            "(or pass a local weights file)"
        )
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        for candidate in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found, pcfg
    url = pcfg.get("url", "")
    if url:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)
        if local.is_file():
            return str(local), pcfg
    return None, pcfg


def _check_random_init(cfg: TeacherConfig) -> bool:
    if cfg.random_init and cfg.pretrained:
        raise ConfigError("teacher.random_init is true and teacher.pretrained is set; choose one")
    if not cfg.random_init and not cfg.pretrained:
        raise ConfigError(
            f"teacher.pretrained is empty for teacher {cfg.name!r}: set an open_clip tag (e.g. openai) or a local "
            "weights file; teacher.random_init: true gives random weights (tests only)"
        )
    return cfg.random_init


def open_clip_quick_gelu(cfg: TeacherConfig, tag_cfg: dict | None) -> bool:
    """The activation the teacher's weights were trained with: QuickGELU (True, OpenAI CLIP) or GELU (False).

    A pretrained tag's metadata decides (``tag_cfg``, open_clip's pretrained cfg); without a tag the model name's
    config does when it says QuickGELU (``ViT-B-16-quickgelu``), else ``teacher.quick_gelu`` must. An explicit
    ``teacher.quick_gelu`` that contradicts the tag or the name is an error, so that the tag, cached-file and
    local-file paths to the same weights always build the same module.
    """
    import open_clip

    if "quick_gelu" in cfg.model_args:
        raise ConfigError("teacher.model_args.quick_gelu is not allowed; set teacher.quick_gelu instead")
    by_name = bool((open_clip.get_model_config(cfg.name) or {}).get("quick_gelu", False))
    known = bool(tag_cfg.get("quick_gelu", False)) if tag_cfg is not None else (True if by_name else None)
    source = f"pretrained tag {cfg.pretrained!r}" if tag_cfg is not None else f"model name {cfg.name!r}"
    if known is not None and cfg.quick_gelu is not None and cfg.quick_gelu != known:
        raise ConfigError(
            f"teacher.quick_gelu={cfg.quick_gelu} contradicts the {source} of teacher {cfg.name}, whose weights "
            f"were trained with {'QuickGELU' if known else 'GELU'}; remove teacher.quick_gelu or set it to {known}"
        )
    if known is not None:
        return known
    if cfg.quick_gelu is None and not cfg.random_init:
        raise ConfigError(
            f"teacher.pretrained={cfg.pretrained!r} is a local file, which does not say which activation its weights "
            "were trained with: set teacher.quick_gelu: true for OpenAI CLIP weights (QuickGELU) or false for "
            "GELU-trained ones (LAION, DataComp, ...)"
        )
    return bool(cfg.quick_gelu)


def load_open_clip_visual(cfg: TeacherConfig) -> nn.Module:
    """The CLIP vision tower with weights from a local file, a cached tag, or random (random_init only).

    Every path passes the activation explicitly (``open_clip_quick_gelu``), so it follows the weights."""
    import open_clip

    if cfg.name not in open_clip.list_models():
        raise ConfigError(f"teacher.name={cfg.name!r} is not an open_clip model; see open_clip.list_models()")
    kwargs = dict(cfg.model_args)
    if _check_random_init(cfg):
        kwargs["quick_gelu"] = open_clip_quick_gelu(cfg, None)
        device = "meta" if torch.get_default_device().type == "meta" else "cpu"  # plans/tests build giants on meta
        return open_clip.create_model(cfg.name, pretrained=None, device=device, **kwargs).visual
    if _looks_like_path(cfg.pretrained):
        path = _checked_local_file(cfg)
        kwargs["quick_gelu"] = open_clip_quick_gelu(cfg, None)
        return open_clip.create_model(cfg.name, pretrained=path, **kwargs).visual
    cached, pcfg = _cached_open_clip_weights(cfg.name, cfg.pretrained)
    kwargs["quick_gelu"] = open_clip_quick_gelu(cfg, pcfg)
    if cached:
        return open_clip.create_model(cfg.name, pretrained=cached, **kwargs).visual
    reason = _hub_offline_reason(pcfg.get("hf_hub") and "https://huggingface.co" or pcfg.get("url", ""))
    if reason:
        raise _no_weights_error(f"open_clip weights {cfg.name}/{cfg.pretrained}", reason)
    with warnings.catch_warnings():  # open_clip warns about a QuickGELU mismatch it checks before our override
        warnings.filterwarnings("ignore", message="QuickGELU mismatch")
        return open_clip.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs).visual


def load_timm_teacher(cfg: TeacherConfig) -> nn.Module:
    """A timm ViT teacher; ``teacher.pretrained`` is a local file or ``hub`` (timm's weights for the name)."""
    import timm

    kwargs = {"num_classes": 0, **cfg.model_args}
    if cfg.image_size:
        kwargs["img_size"] = cfg.image_size
    try:
        if _check_random_init(cfg):
            return timm.create_model(cfg.name, pretrained=False, **kwargs)
        if cfg.pretrained != "hub":
            overlay = {"file": _checked_local_file(cfg)}
            return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        pcfg = timm.models.get_pretrained_cfg(cfg.name)
        hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
        if hub_id:
            from huggingface_hub import try_to_load_from_cache

            cached = [try_to_load_from_cache(hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")]
            if not any(isinstance(c, str) for c in cached):
                reason = _hub_offline_reason("https://huggingface.co")
                if reason:
                    raise _no_weights_error(f"timm weights {cfg.name}", reason)
        return timm.create_model(cfg.name, pretrained=True, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"teacher.name={cfg.name!r} is not a timm model; see timm.list_models()") from err
        raise


def build_teacher(cfg: TeacherConfig, output: str, data: DataConfig) -> FrozenTeacher:
    """Build the frozen teacher the config names (``output``: block, norm or projected tokens)."""
    if not cfg.name:
        raise ConfigError(f"teacher.kind={cfg.kind} needs teacher.name (e.g. ViT-B-16 for open_clip)")
    if cfg.kind not in TEACHER_LOADERS:
        raise ConfigError(f"teacher.kind={cfg.kind!r} has no teacher; set one of {', '.join(TEACHER_LOADERS)}")
    load, teacher = TEACHER_LOADERS[cfg.kind]
    return teacher(load(cfg), cfg, output, data)


TEACHER_LOADERS = {"open_clip": (load_open_clip_visual, OpenClipTeacher), "timm": (load_timm_teacher, TimmTeacher)}
if set(TEACHER_LOADERS) != set(TEACHER_KINDS) - {"none"}:  # the config's list is this table's keys
    raise ImportError(
        f"models/teacher_kinds.py lists {TEACHER_KINDS}, models/teachers.py builds {set(TEACHER_LOADERS)}"
    )
