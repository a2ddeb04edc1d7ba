"""ViT-backbone detectors (``visionpeft.vitdet.VitDetModel``): a timm ViT, a simple feature pyramid, a YOLO head.

Defaults: LoRA/DoRA on the ViT's attention ``qkv``/``proj`` and MLP ``fc1``/``fc2`` linears; AdaptFormer bottlenecks
beside each ViT block's ``mlp``. The ViT stays frozen. The pyramid and the head are trained in full with every
adapter (a trainable copy of each of their layers, saved in the adapter file): they are small, task-specific and,
unlike the ViT, not pretrained on anything that transfers, so low-rank updates of them would only slow learning
down. A new class list re-initialises the class-output convs, as for YOLO. Everything else (class names, head
class count, merging before Ultralytics' Conv+BN fusion) is the YOLO family's behaviour: the model is a
``DetectionModel``.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from ..modules import base_named_modules
from .yolo import YoloFamily

VIT_LINEARS = {"target_types": ["Linear"], "target_modules": ["qkv", "proj", "fc1", "fc2"]}


def _in_pyramid_or_head(name: str) -> bool:
    """Layers after the backbone (``model.0``), except the DFL's fixed projection."""
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() and int(parts[1]) >= 1 \
        and not name.endswith("dfl.conv")


class VitDetFamily(YoloFamily):
    name = "vitdet"
    defaults = {
        "lora": VIT_LINEARS,
        "dora": VIT_LINEARS,
        "loha": VIT_LINEARS,
        "bottleneck": {"target_modules": [r"model\.0\.vit\.blocks\.\d+\.mlp"]},
    }

    def matches(self, model: nn.Module) -> bool:
        vitdet = sys.modules.get("visionpeft.vitdet.model")
        return vitdet is not None and isinstance(model, vitdet.VitDetModel)

    zero_class_weights = False  # the head is new: its class outputs read untrained features (random init kept)

    def class_output_replacements(self, model: nn.Module, names: dict[int, str] | None) -> list:
        """Every parameterised layer of the pyramid and head, as a trainable copy (class outputs re-initialised)."""
        fresh = {name: new for name, _, _, new in super().class_output_replacements(model, names)}
        out = []
        for name, module, wrapper in base_named_modules(model):
            if _in_pyramid_or_head(name) and next(module.parameters(recurse=False), None) is not None:
                out.append((name, module, wrapper, fresh.pop(name, None) or copy.deepcopy(module)))
        if fresh:  # a class output that is not a plain layer of the head: the model is not what this family expects
            raise ValueError(f"Class outputs {sorted(fresh)} are not layers of the detector's head.")
        return out

    def on_inject(self, model: nn.Module) -> None:
        """As YOLO, and the base is recorded as its spec (``vitdet:...``), which rebuilds it exactly: adapter files
        then name a base that ``load_base`` (and so export) can recreate. A trainer may record a file instead."""
        super().on_inject(model)
        model.visionpeft.setdefault("base", model.spec.source())

    def example_input(self, model: nn.Module) -> torch.Tensor:
        p = next(model.parameters())
        size = 2 * int(max(model.stride))  # two cells at the coarsest level; a multiple of every stride
        return torch.zeros(1, model.yaml.get("channels", 3), size, size, device=p.device, dtype=p.dtype)
