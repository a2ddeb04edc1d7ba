"""ONNX files through the Ultralytics exporter, with visionpeft's metadata beside Ultralytics'.

The model handed over must be plain (adapters merged, ``visionpeft.merge``): the exporter fuses Conv+BN, which
would drop unmerged adapters. Going through Ultralytics keeps its graph conventions (decoded ``(1, 4 + nc, A)``
output) and metadata (names, stride, imgsz), so ``YOLO("model.onnx")`` predicts and validates the file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..io import atomic_write_bytes

#: metadata_props key holding visionpeft's JSON (one key, so it cannot collide with Ultralytics' keys)
METADATA_KEY = "visionpeft"
CACHE_ENV = "VISIONPEFT_CACHE"


@functools.cache
def telemetry_off() -> None:
    """Turn off onnxruntime's telemetry events (on by default in its Windows builds) for this process, before any
    session exists: visionpeft's own sessions and those Ultralytics opens to validate an export."""
    import onnxruntime

    onnxruntime.disable_telemetry_events()


def cache_dir() -> Path:
    """Where exports of plain base models are kept for comparison: ``$VISIONPEFT_CACHE`` or ~/.cache/visionpeft."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visionpeft"


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Lower Ultralytics' logging while it works on a temporary path (its hints would name that path)."""
    from ultralytics.utils import LOGGER

    previous = LOGGER.level
    LOGGER.setLevel(max(level, previous))
    try:
        yield
    finally:
        LOGGER.setLevel(previous)


def export_onnx(model: nn.Module, path: str | Path, imgsz: int | tuple[int, int] = 640, dynamic: bool = False,
                opset: int | None = None, metadata: dict | None = None, data: str | None = None) -> Path:
    """Export a plain Ultralytics ``DetectionModel`` to ``path`` with Ultralytics' exporter (CPU, FP32, simplified).

    ``metadata`` is stored as JSON under the ``visionpeft`` key of the ONNX metadata; ``data`` (the training
    dataset) goes into Ultralytics' description. The model is not modified
    (the exporter fuses and switches a copy to export mode). The file appears atomically.
    """
    import onnx
    from ultralytics.engine.exporter import Exporter
    from ultralytics.nn.tasks import DetectionModel

    from ..integrations.ultralytics import set_export_name

    if not isinstance(model, DetectionModel):
        raise TypeError(f"ONNX export takes an Ultralytics DetectionModel, not {type(model).__name__}.")
    if any(type(m).__name__ == "AdaptedModule" and any(a.mergeable for a in m.adapters.values())
           for m in model.modules()):
        raise ValueError("The model still carries mergeable adapters: merge them first (visionpeft.merge), since "
                         "the exporter's Conv+BN fusion would drop them.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu()
    telemetry_off()  # the exporter checks its file in an onnxruntime session
    if data is not None:
        model.args = {**(model.args if isinstance(getattr(model, "args", None), dict) else {}), "data": str(data)}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp:
        set_export_name(model, Path(tmp) / f"{path.stem}.pt")  # the exporter names its output after this file
        overrides = {"format": "onnx", "imgsz": imgsz, "batch": 1, "device": "cpu", "dynamic": dynamic,
                     "opset": opset, "simplify": True, "quantize": None, "nms": None, "data": None,
                     "verbose": False, "mode": "export"}
        with _quiet():
            out = Exporter(overrides=overrides)(model=model)
        if not out or not Path(out).is_file():
            raise RuntimeError(f"The Ultralytics ONNX exporter produced no file for '{path}'; see the log above.")
        proto = onnx.load(out)
        if metadata is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
        return atomic_write_bytes(path, proto.SerializeToString())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict (``visionpeft`` holds JSON, the others Ultralytics' strings)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def update_metadata(path: str | Path, changes: dict) -> Path:
    """Update keys of the visionpeft metadata of an ONNX file (atomically)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps({**json.loads(props.get(METADATA_KEY, "{}")), **changes}, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    return atomic_write_bytes(path, proto.SerializeToString())


def base_export(model: nn.Module, imgsz: int | tuple[int, int], dynamic: bool = False, opset: int | None = None,
                key: str | None = None) -> Path:
    """The ONNX export of a plain base model, cached by base fingerprint and export options.

    The exports of adapted models are compared against it (node counts, latency).
    """
    import torch
    import ultralytics

    from ..inject import fingerprint

    if key is None:
        fp = fingerprint(model)
        key = f"{fp['architecture']}-{fp['weights']}"
    options = json.dumps([key, imgsz, dynamic, opset, ultralytics.__version__, torch.__version__])
    path = cache_dir() / "base_onnx" / f"{hashlib.sha256(options.encode()).hexdigest()[:20]}.onnx"
    if not path.is_file():
        export_onnx(model, path, imgsz=imgsz, dynamic=dynamic, opset=opset)
    return path
