"""A timm Vision Transformer as a detector backbone: one feature map at the patch stride, from timm's own API.

Any timm ViT-family model with ``forward_intermediates`` and a ``patch_embed`` works (``vit_*``, ``deit_*``, register
and distilled variants, EVA-style ``Eva`` models). It is created with ``dynamic_img_size=True``, so its position
embeddings are interpolated to every input size the detector sees (training size, rectangular validation batches,
export size). Pretrained weights come from a local file or the Hugging Face cache; the hub is used only when the
user turned ``HF_HUB_OFFLINE`` off, so an offline run never tries to download.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from ultralytics.utils import LOGGER

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as "set"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a hub repo, in its order
WEIGHT_EXTS = (".safetensors", ".pth", ".bin")
RESERVED_KWARGS = {"pretrained", "num_classes", "dynamic_img_size", "in_chans", "img_size", "patch_size",
                   "pretrained_cfg_overlay"}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (visionpeft sets ``HF_HUB_OFFLINE=1`` unless the user set it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_backbone(name: str, timm_kwargs: dict | None) -> None:
    """A known timm model name, and no ``timm_kwargs`` that the detector sets itself."""
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"Unknown timm model '{name}'. List ViT backbones with timm.list_models('vit_*') or "
            "timm.list_models('deit_*'); a pretrained tag may follow the name (vit_small_patch14_reg4_dinov2.lvd142m)."
        )
    reserved = sorted(set(timm_kwargs or {}) & RESERVED_KWARGS)
    if reserved:
        raise ValueError(f"timm_kwargs {reserved} are set by the ViT detector; use its own options (pretrained, "
                         "img_size, patch_size) or leave them out.")


def backbone_stride(name: str, patch_size: int | None, timm_kwargs: dict | None = None) -> tuple[int, int | None]:
    """The feature stride the backbone will have, and the ``patch_size`` to create it with (``None``: its own).

    The pyramid needs a power-of-two stride (8/16/32 px levels); a model with other patches (DINOv2's 14 px) gets its
    patch embedding resampled to 16 px, which timm does to pretrained weights on load.
    """
    import timm
    from timm.layers import PatchEmbed

    check_backbone(name, timm_kwargs)
    with torch.device("meta"):  # architecture only: no memory, no init cost
        probe = timm.create_model(name, pretrained=False, num_classes=0, **(timm_kwargs or {}))
    embed = getattr(probe, "patch_embed", None)
    if embed is None or not hasattr(probe, "forward_intermediates"):
        raise ValueError(f"timm model '{name}' is not a Vision Transformer (no patch_embed / forward_intermediates). "
                         "Use a ViT-family model such as vit_small_patch16_224 or deit_small_patch16_224.")
    if patch_size is not None:
        if not is_power_of_two(int(patch_size)) or type(embed) is not PatchEmbed:
            raise ValueError(f"patch_size={patch_size} is not usable for '{name}': it must be a power of two (8, 16, "
                             "32) and the model must have a plain PatchEmbed.")
        return int(patch_size), int(patch_size)
    stride = int(embed.feat_ratio())
    if is_power_of_two(stride):
        return stride, None
    if type(embed) is PatchEmbed:
        LOGGER.info(f"visionpeft: '{name}' has {stride} px patches; the detector needs power-of-two strides, so its "
                    "patch embedding is resampled to 16 px.")
        return 16, 16
    raise ValueError(f"'{name}' has a feature stride of {stride} px; the detector needs a power of two (8, 16, 32).")


def assets_file(name: str) -> str | None:
    """``<name>.safetensors`` (or ``.pth``/``.bin``) in the assets' ``weights/``, also under ``<arch>.<tag>``."""
    import timm

    from .. import settings

    cfg = timm.models.get_pretrained_cfg(name)
    stems = [name] + ([f"{cfg.architecture}.{cfg.tag}"] if cfg is not None and cfg.tag else [])
    for stem in stems:
        for ext in WEIGHT_EXTS:
            path = settings.weights_dir() / f"{stem}{ext}"
            if path.is_file():
                return str(path)
    return None


def cached_hub_file(name: str) -> str | None:
    """The pretrained weights of ``name`` in the local Hugging Face cache, found without any network access."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    for filename in [f for f in (getattr(cfg, "hf_hub_filename", None), *HUB_FILES) if f]:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def create_vit(name: str, *, pretrained: bool | str | Path, img_size: int | None, patch_size: int | None,
               in_chans: int = 3, timm_kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """The timm ViT (no classifier) and where its weights came from.

    ``pretrained``: a weights file (path, or a bare name found in the assets' ``weights/``), ``True`` for timm's
    pretrained weights of ``name`` (``<name>.safetensors`` in the assets' ``weights/``, else the local Hugging Face
    cache, else the hub but only when ``HF_HUB_OFFLINE`` is off), or ``False`` for random weights. Without weights
    offline, the ViT starts random and a warning says how to fix it.
    """
    import timm

    from .. import settings
    from ..paths import resolve_weights

    check_backbone(name, timm_kwargs)
    kwargs = {"num_classes": 0, "dynamic_img_size": True, "in_chans": in_chans, **(timm_kwargs or {})}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if pretrained is True or pretrained is False:
        file = (assets_file(name) or cached_hub_file(name)) if pretrained else None
    else:
        file = str(resolve_weights(pretrained))
    if file:
        # timm's own loader: drops the classifier, resamples position and patch embeddings to this geometry
        vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": file}, **kwargs)
        return vit, file
    if pretrained and not hub_offline():
        return timm.create_model(name, pretrained=True, **kwargs), "timm hub"
    if pretrained:
        LOGGER.warning(
            f"visionpeft: no pretrained weights for '{name}' are available offline (neither "
            f"{settings.weights_dir() / name}.safetensors nor the Hugging Face cache), so the ViT starts from RANDOM "
            "weights and a frozen random backbone detects nothing useful. Put the timm weights file there, pass one "
            "(pretrained: path/to/model.safetensors), or allow the download with HF_HUB_OFFLINE=0."
        )
    return timm.create_model(name, pretrained=False, **kwargs), "random"


@contextlib.contextmanager
def export_grid(vit: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """During ONNX export, give timm position embeddings already resampled to the input's grid, as a constant.

    timm resamples them with antialiased bicubic interpolation, which ONNX cannot express; with embeddings that
    match the grid it skips resampling. The constant is computed here, outside the traced graph (the numpy round
    trip cuts it off, and the dead resampling node is dropped), so an export works at any fixed input size.
    """
    from timm.layers import resample_abs_pos_embed

    embed, pos = vit.patch_embed, getattr(vit, "pos_embed", None)
    grid = tuple(int(g) for g in embed.dynamic_feat_size(tuple(x.shape[-2:])))
    if pos is None or grid == tuple(embed.grid_size):
        yield
        return
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    new = resample_abs_pos_embed(pos, list(grid), old_size=list(embed.grid_size), num_prefix_tokens=prefix)
    saved = pos, embed.grid_size
    vit.pos_embed = nn.Parameter(torch.from_numpy(new.detach().cpu().numpy()).to(pos), requires_grad=False)
    embed.grid_size = grid
    try:
        yield
    finally:
        vit.pos_embed, embed.grid_size = saved


class TimmViTBackbone(nn.Module):
    """Normalised image -> ViT -> the last block's tokens as a ``(B, C, H/stride, W/stride)`` map.

    Ultralytics feeds images scaled to [0, 1]; the ViT was pretrained on images normalised with its own mean and
    std, applied here so the frozen features mean what they meant in pretraining (and so export carries it along).
    """

    def __init__(self, vit: nn.Module, stride: int, in_chans: int = 3) -> None:
        super().__init__()
        self.vit = vit
        self.stride = stride
        self.out_channels = int(vit.embed_dim)
        vit.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)  # keep all blocks, drop the head
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        mean, std = list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225)))
        if len(mean) != in_chans:  # grey or multispectral input on an RGB-pretrained model: one mean for all
            mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=True)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        with export_grid(self.vit, x) if torch.onnx.is_in_onnx_export() else contextlib.nullcontext():
            return self.vit.forward_intermediates(x, indices=1, norm=True, intermediates_only=True,
                                                  output_fmt="NCHW")[0]
