"""visionpeft: parameter-efficient fine-tuning (LoRA, DoRA, bottleneck adapters) for YOLO detectors and ViTs.

The pipeline API::

    import visionpeft as vp
    model = vp.load_base("yolo11n.pt")                          # or "yolo11n.yaml", "timm:vit_tiny_patch16_224"
    vp.inject(model, vp.LoraConfig(r=8), adapter_name="weeds", names=["crop", "weed"])
    print(vp.trainable_report(model))
    vp.save_adapter(model, "weeds.safetensors")
    vp.load_adapter(other_copy_of_base, "weeds.safetensors")  # checks the base fingerprint
    vp.set_adapter(model, "weeds")                             # switch adapters without reloading the base
    plain = vp.merge(model)                                    # a plain DetectionModel / timm model
    plan = vp.plan_ranks(model, [{"method": "dora", "r": 8}], "5%", losses)  # ranks per layer from a budget
    yolo = vp.YOLO("yolo11n.pt", adapters=["weeds.safetensors"])  # Ultralytics predict/val/track/export
"""

from __future__ import annotations

from . import settings  # noqa: F401  (sets the offline switches before Ultralytics is imported)
from .version import __version__

try:
    import torch  # noqa: F401
except ImportError as _error:  # a device applying patches (python -m visionpeft.edge) has numpy and onnx only
    _NO_TORCH: ImportError | None = _error
else:
    _NO_TORCH = None
    from .integrations.ultralytics import check_version as _check_ultralytics

    _check_ultralytics()  # one clear error for an untested Ultralytics, before anything imports it
    from .budget import RankPlan, plan_ranks
    from .data_init import init_from_data
    from .inject import (
        base_state_dict,
        delete_adapter,
        fingerprint,
        freeze,
        inject,
        merge,
        peft_state,
        scale_adapter,
        set_adapter,
        trainable_report,
    )
    from .io import AdapterFileError, load_adapter, read_adapter, save_adapter
    from .methods import (
        BottleneckConfig,
        DoraConfig,
        LohaConfig,
        LoraConfig,
        NormStatsConfig,
        ShiftConfig,
        TrainableConfig,
        config_from_dict,
    )
    from .models import load_base


def __getattr__(name: str):
    if _NO_TORCH is not None and name in __all__:
        raise ImportError(f"visionpeft.{name} needs torch, which failed to import ({_NO_TORCH}); without torch only "
                          "the device tools work: python -m visionpeft.edge")
    # visionpeft.YOLO subclasses Ultralytics' YOLO: imported on first use, so `import visionpeft` stays light
    if name == "YOLO":
        from .yolo_model import YOLO

        return YOLO
    raise AttributeError(f"module 'visionpeft' has no attribute '{name}'")


__all__ = [
    "AdapterFileError",
    "BottleneckConfig",
    "DoraConfig",
    "LohaConfig",
    "LoraConfig",
    "NormStatsConfig",
    "RankPlan",
    "ShiftConfig",
    "TrainableConfig",
    "YOLO",
    "__version__",
    "base_state_dict",
    "config_from_dict",
    "delete_adapter",
    "fingerprint",
    "freeze",
    "init_from_data",
    "inject",
    "load_adapter",
    "load_base",
    "merge",
    "peft_state",
    "plan_ranks",
    "read_adapter",
    "save_adapter",
    "scale_adapter",
    "set_adapter",
    "trainable_report",
]
