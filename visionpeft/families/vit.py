"""timm Vision Transformers (``VisionTransformer`` and its DeiT, AugReg, register-token variants).

Defaults: LoRA/DoRA on the attention ``qkv``/``proj`` and MLP ``fc1``/``fc2`` linears; AdaptFormer bottlenecks
beside each block's ``mlp``. A new class list replaces the classifier ``head`` with a trainable one.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..modules import base_named_modules
from .base import Family


class VitFamily(Family):
    name = "vit"
    defaults = {
        "lora": {"target_types": ["Linear"], "target_modules": ["qkv", "proj", "fc1", "fc2"]},
        "dora": {"target_types": ["Linear"], "target_modules": ["qkv", "proj", "fc1", "fc2"]},
        "loha": {"target_types": ["Linear"], "target_modules": ["qkv", "proj", "fc1", "fc2"]},
        "bottleneck": {"target_modules": [r"blocks\.\d+\.mlp"]},
    }

    def matches(self, model: nn.Module) -> bool:
        vt = sys.modules.get("timm.models.vision_transformer")
        return vt is not None and isinstance(model, vt.VisionTransformer)

    def class_output_replacements(self, model: nn.Module, names: dict[int, str] | None) -> list:
        if names is None or len(names) == getattr(model, "num_classes", None):
            return []
        for name, module, wrapper in base_named_modules(model):
            if name == "head" and isinstance(module, nn.Linear):
                new = nn.Linear(module.in_features, len(names)).to(module.weight.device)
                return [(name, module, wrapper, new)]
        raise ValueError("This ViT has no linear classifier 'head' to re-initialise for the new class names.")

    def example_input(self, model: nn.Module) -> torch.Tensor:
        p = next(model.parameters())
        size = tuple(model.patch_embed.img_size)
        return torch.zeros(1, model.patch_embed.proj.in_channels, *size, device=p.device, dtype=p.dtype)

    def on_activate(self, model: nn.Module, adapter: dict | None) -> None:
        names = (adapter or {}).get("names")
        if names:
            model.num_classes = len(names)
