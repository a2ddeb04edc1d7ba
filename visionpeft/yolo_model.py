"""``visionpeft.YOLO``: an Ultralytics ``YOLO`` object over a base model carrying adapters.

``predict``, ``val``, ``track``, ``export``, ``info`` and the other Ultralytics calls run on a plain model with the
active adapter merged in, so they return Ultralytics ``Results``/metrics and export like any YOLO. The base with all
its adapters stays unmerged beside it (``adapted_model``): switching adapters activates another one there and hands
Ultralytics that adapter's merged copy (made once, then cached), with a fresh predictor, so the next call uses it;
the base is never reloaded.

::

    model = vp.YOLO("yolo11n.pt", adapters=["crops.safetensors", "coco.safetensors"])
    model.set_adapter("crops")
    boxes = model.predict("field.jpg", imgsz=320)[0].boxes
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics import YOLO as UltralyticsYOLO

from .class_offset import names_offset, offset_dataset
from .datasets import check_class_names, load_dataset
from .inject import merge, set_adapter
from .integrations.ultralytics import DetectorSource, checkpoint_path, set_export_name
from .io import load_adapter
from .models import load_base

ADAPTER_IN_RUN = Path("weights") / "best.safetensors"


def adapter_path(source: str | Path) -> Path:
    """An adapter file, or a training run folder holding ``weights/best.safetensors``."""
    p = Path(source).expanduser()
    return p / ADAPTER_IN_RUN if p.is_dir() else p


class YOLO(DetectorSource, UltralyticsYOLO):
    """Ultralytics ``YOLO`` over ``model`` (weights name/path, model YAML, or a module, plain or with adapters),
    with the adapter files (or run folders) in ``adapters`` loaded onto it; the last one loaded is active.

    Bare weight names are looked up in the assets' ``weights/`` (nothing is downloaded) and checkpoints are loaded
    without running code from them (:func:`visionpeft.load_base`).
    """

    def __init__(self, model: str | Path | nn.Module = "yolo11n.pt", adapters: str | Path | Iterable = (),
                 task: str | None = None, verbose: bool = False) -> None:
        object.__setattr__(self, "_vp_source", model)  # read by load_model below, before nn.Module's set-up
        # Ultralytics dispatches on the string (YAML or not); a module prints as 25 KB
        super().__init__(model=model if isinstance(model, (str, Path)) else "model.pt", task=task, verbose=verbose)
        object.__setattr__(self, "_merged", {})  # adapter name (None: the base) -> merged plain model
        for source in [adapters] if isinstance(adapters, (str, Path)) else adapters:
            self.load_adapter(source)
        self._activate(self.active_adapter)

    def load_model(self, source: str) -> tuple[nn.Module, str | None]:
        """The base from :func:`visionpeft.load_base` (assets lookup, no download, no arbitrary unpickling), for
        Ultralytics' ``Model.__init__`` (through :class:`~visionpeft.integrations.ultralytics.DetectorSource`)."""
        source = self.__dict__.pop("_vp_source", source)
        base = load_base(source)
        self._modules["_adapted"] = base
        return base, checkpoint_path(base) or (str(source) if isinstance(source, (str, Path)) else None)

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def adapted_model(self) -> nn.Module:
        """The base model with every loaded adapter, unmerged (the :mod:`visionpeft` API works on it)."""
        return self._modules["_adapted"]

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        state = getattr(self.adapted_model, "visionpeft", None)
        return sorted(state["adapters"]) if state else []

    @property
    def active_adapter(self) -> str | None:
        state = getattr(self.adapted_model, "visionpeft", None)
        return state["active"] if state else None

    def load_adapter(self, source: str | Path, adapter_name: str | None = None, activate: bool = True) -> YOLO:
        """Load an adapter file (or a training run folder's ``weights/best.safetensors``) onto the base."""
        load_adapter(self.adapted_model, adapter_path(source), adapter_name=adapter_name, activate=activate)
        self._merged.clear()  # a reloaded name must not keep its old merged copy; the others are rebuilt lazily
        self._activate(self.active_adapter)
        return self

    def set_adapter(self, adapter_name: str | None) -> YOLO:
        """Make ``adapter_name`` (``None``: the plain base) the model the next predict/val/track/export uses."""
        if adapter_name is not None or self.adapters:
            set_adapter(self.adapted_model, adapter_name)
        self._activate(adapter_name)
        return self

    def _activate(self, adapter_name: str | None) -> None:
        merged = self._merged.get(adapter_name)
        if merged is None:
            adapted = self.adapted_model
            merged = merge(adapted) if getattr(adapted, "visionpeft", None) else adapted
            name = adapter_name or Path(str(self.ckpt_path or "model")).stem
            # Ultralytics' exporter names its file after pt_path: '<adapter>.onnx' in the working directory,
            # never beside the base weights (the assets folder may be read-only)
            set_export_name(merged, Path.cwd() / f"{name}.pt")
            self._merged[adapter_name] = merged
        self.model = merged
        self.predictor = None  # Ultralytics reuses a predictor (and its fused model) across calls

    # -- Ultralytics calls that need visionpeft's inputs --------------------------------------------------------
    def val(self, validator=None, check_names: bool = True, **kwargs: Any):
        """Ultralytics validation; ``data`` may be a name in visionpeft's ``datasets/``. A dataset whose class names
        differ from the active adapter's is refused unless ``check_names=False``; an adapter that keeps the base
        classes validates on the base's dataset (base classes) or on its own (new classes, relabelled to follow
        the base's)."""
        data = kwargs.get("data")
        if data is None:
            raise ValueError("val needs a dataset: pass data=<dataset YAML or name>, e.g. data='crop_weed'.")
        offset = self._class_offset(data) if check_names else 0
        with tempfile.TemporaryDirectory(prefix="visionpeft-val-") as tmp:
            kwargs["data"] = str(offset_dataset(data, self.model.names, offset, tmp))
            return super().val(validator=validator, **kwargs)

    def _class_offset(self, data: str | Path) -> int:
        """Where the dataset's class 0 is among the model's: a keep-base model's data may hold a run of its classes
        (the base's, or the new ones); any other model's must have its classes."""
        if getattr(self.model, "keep_base", None):
            offset = names_offset(self.model.names, load_dataset(data)[0].get("names"))
            if offset is not None:
                return offset
        check_class_names(self.model.names, data)
        return 0

    def train(self, *args: Any, **kwargs: Any):
        raise TypeError("visionpeft.YOLO predicts, validates and exports; train adapters with "
                        "visionpeft.train.train(cfg, **overrides) or scripts/train.py --cfg <config>.")

    def __repr__(self) -> str:
        return (f"visionpeft.YOLO(base={self.ckpt_path!r}, adapters={self.adapters}, "
                f"active={self.active_adapter!r})")

