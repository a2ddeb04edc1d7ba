"""Ultralytics YOLO detectors (YOLOv5u, v8, 11, 26 ``DetectionModel``s).

Defaults: LoRA/DoRA on every conv of backbone, neck and head except the DFL (a fixed projection); bottleneck
adapters beside the C2f/C3k2/C3/C2PSA blocks. A new class list re-initialises the head's class-output convs as
trainable modules (the box branch keeps its pretrained weights). Injected detectors become a
``PeftDetectionModel``, whose ``fuse()`` merges adapters before Conv+BN fusion, which would otherwise drop them.
An adapter that keeps the base classes (``keep_base``) merges into a base-plus-branch model (:mod:`.yolo_keep`).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..integrations.ultralytics import retype
from ..keep_modes import SHARED_BOXES, SHARED_MODES, SHARED_TRUNK
from ..modules import base_named_modules
from .base import Family

CLASS_HEADS = ("cv3", "one2one_cv3")


def _detection_model_cls():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel


def _peft_detection_model_cls():
    DetectionModel = _detection_model_cls()

    class PeftDetectionModel(DetectionModel):
        """A ``DetectionModel`` carrying adapters. Fusion (Ultralytics val/predict/export) merges them first."""

        def fuse(self, verbose: bool = True, imgsz: int = 640):
            YoloFamily().merge_(self)  # plain modules again (adapters folded in), so Conv+BN folding sees them
            return DetectionModel.fuse(self, verbose=verbose, imgsz=imgsz)

    PeftDetectionModel.__module__ = __name__
    PeftDetectionModel.__qualname__ = "PeftDetectionModel"
    return PeftDetectionModel


def __getattr__(name: str):
    # Built on first use so importing visionpeft does not import Ultralytics; pickled checkpoints find it here.
    if name == "PeftDetectionModel":
        cls = _peft_detection_model_cls()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def class_bias(nc: int, stride: float) -> float:
    """Ultralytics' prior for class logits: about 5 objects per 640 px image spread over ``nc`` classes."""
    return math.log(5 / nc / (640 / stride) ** 2)


class YoloFamily(Family):
    name = "yolo"
    #: New class outputs start at zero weights (every logit the prior ``class_bias``), not at PyTorch's random
    #: init, which Ultralytics keeps: on the pretrained head's large features a random 1x1 conv gives logits far
    #: from the prior, and one draw moved a crop_weed run by 5 points of mAP50-95 (README, "Across domains").
    zero_class_weights = True
    defaults = {
        "lora": {"target_types": ["Conv2d"], "exclude_modules": ["dfl.conv"]},
        "dora": {"target_types": ["Conv2d"], "exclude_modules": ["dfl.conv"]},
        "loha": {"target_types": ["Conv2d"], "exclude_modules": ["dfl.conv"]},
        "bottleneck": {"target_types": ["C2f", "C3k2", "C3", "C2PSA", "A2C2f"]},
        "norm_stats": {"target_types": ["BatchNorm2d"]},
        "shift": {"target_types": ["BatchNorm2d"]},
    }

    def matches(self, model: nn.Module) -> bool:
        tasks = sys.modules.get("ultralytics.nn.tasks")
        return tasks is not None and isinstance(model, tasks.DetectionModel)

    def head(self, model: nn.Module) -> nn.Module:
        return model.model[-1]

    def class_output_replacements(self, model: nn.Module, names: dict[int, str] | None) -> list:
        base_names = getattr(model, "visionpeft", {}).get("base_names") or model.names
        if names is None or names == base_names:
            return []
        head, nc = self.head(model), len(names)
        index = f"model.{len(model.model) - 1}"
        wanted = {}
        for attr in CLASS_HEADS:
            for i, _ in enumerate(getattr(head, attr, None) or []):
                wanted[f"{index}.{attr}.{i}.2"] = float(head.stride[i])
        out = []
        for name, module, wrapper in base_named_modules(model):
            if name in wanted:
                new = nn.Conv2d(module.in_channels, nc, 1).to(module.weight.device)
                if self.zero_class_weights:
                    nn.init.zeros_(new.weight)
                nn.init.constant_(new.bias, class_bias(nc, wanted[name]))
                out.append((name, module, wrapper, new))
        return out

    def example_input(self, model: nn.Module) -> torch.Tensor:
        p = next(model.parameters())
        return torch.zeros(1, model.yaml.get("channels", 3), 64, 64, device=p.device, dtype=p.dtype)

    def keep_base_start(self, model: nn.Module, names: dict[int, str] | None, targets: list[str],
                        mode: bool | str = True) -> int:
        from . import yolo
        from .yolo_keep import branch_start, check_keep_base

        if type(model) not in (_detection_model_cls(), yolo.PeftDetectionModel):
            raise ValueError(f"keep_base works on Ultralytics YOLO detectors (YOLOv5u, v8, 11), not on a "
                             f"{type(model).__name__}; train without keep_base.")
        base_names = getattr(model, "visionpeft", {}).get("base_names") or model.names
        check_keep_base(model, {int(k): v for k, v in base_names.items()}, names)
        return len(model.model) - 1 if mode in SHARED_MODES else branch_start(targets)  # shared: from the head on

    def keep_base_model(self, base: nn.Module, branch: nn.Module, start: int, mode: bool | str = True) -> nn.Module:
        from .yolo_keep import keep_base_model, keep_classes_model

        if mode == SHARED_BOXES:
            return keep_classes_model(base, branch)
        return keep_base_model(base, branch, start, shared_trunk=mode == SHARED_TRUNK)

    def new_classes_only(self, model: nn.Module, name: str, mode: bool | str) -> bool:
        if mode not in SHARED_MODES:
            return True  # a branch: every adapted layer is the branch's own copy
        head = f"model.{len(model.model) - 1}."
        return name.startswith(head + "cv3." if mode == SHARED_BOXES else head)

    def on_inject(self, model: nn.Module) -> None:
        state = model.visionpeft
        state.setdefault("base_names", dict(model.names))
        if type(model) is _detection_model_cls():
            from . import yolo

            retype(model, yolo.PeftDetectionModel)

    def on_activate(self, model: nn.Module, adapter: dict | None) -> None:
        names = (adapter or {}).get("names") or model.visionpeft["base_names"]
        names = {int(k): v for k, v in names.items()}
        head = self.head(model)
        model.names = names
        model.yaml["nc"] = head.nc = len(names)
        head.no = head.nc + head.reg_max * 4
        if getattr(model, "criterion", None) is not None:
            model.criterion = None  # the loss caches the class count; rebuild it lazily

    def on_unload(self, model: nn.Module) -> None:
        from . import yolo

        if type(model) is yolo.PeftDetectionModel:
            retype(model, _detection_model_cls())
