"""Build or load a base model by name or path: Ultralytics checkpoints and YAMLs, timm models.

Checkpoints are unpickled with ``torch.load(weights_only=True)``: only the globals a plain Ultralytics detector
needs (its layer classes, torch.nn layers, a few data types) are allowed, so a crafted ``.pt`` cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from .integrations.ultralytics import legacy_checkpoint_globals, prepare_loaded_model, restricted_builds
from .paths import resolve_weights

#: modules whose ``nn.Module`` classes a base checkpoint may name
LAYER_MODULES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")
#: plain data types a checkpoint may hold besides tensors (train args, metrics); torch allows the basic ones itself
DATA_GLOBALS = ("collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset",
                "builtins.slice", "builtins.range", "builtins.complex", "ultralytics.utils.IterableSimpleNamespace")


def _aliases() -> dict[str, object]:
    """Globals allowed under another name: Ultralytics' legacy paths (and its ``getattr``, restricted) and numpy's
    scalar/dtype reconstructors (metrics saved as numpy floats)."""
    import numpy as np

    scalar = np.float64(0).__reduce__()[0]
    return {
        **legacy_checkpoint_globals(),
        "numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar, "numpy.dtype": np.dtype,
        "pathlib.PosixPath": type(Path()), "pathlib.WindowsPath": type(Path()),
    }


def _allowed_global(name: str, aliases: dict[str, object]) -> object | None:
    """The object a checkpoint's global ``name`` stands for, or None when a plain detector has no need of it."""
    if name in aliases:
        return aliases[name]
    module, _, attr = name.rpartition(".")
    layer = any(module == m or module.startswith(f"{m}.") for m in LAYER_MODULES)
    if not layer and name not in DATA_GLOBALS and module != "numpy.dtypes":
        return None
    try:  # only modules of the allow-list are imported
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if layer:
        return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None
    if module == "numpy.dtypes":
        import numpy as np

        return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
    return obj


def safe_globals_for(path: Path) -> list[tuple[object, str]]:
    """The ``(object, name)`` allow-list entries checkpoint ``path`` needs; ValueError naming the first global
    outside what a plain Ultralytics detector checkpoint holds."""
    import numpy as np

    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"'{path}' is not a PyTorch checkpoint saved by torch.save (corrupt or truncated?): "
                         f"{e}".replace("\n", " ")) from e
    aliases = _aliases()
    entries = []
    for name in needed:
        obj = _allowed_global(name, aliases)
        if obj is None:
            raise ValueError(f"'{path}' is not a plain Ultralytics checkpoint: it references `{name}`; refusing to "
                             "unpickle it. Use Ultralytics weights you trust, re-saved by Ultralytics.")
        entries.append((obj, name))
    if "numpy.dtype" in needed:  # np.dtype(...) returns a per-dtype class the checkpoint scan cannot see
        entries += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFD"]
    return entries


def load_checkpoint(path: str | Path) -> nn.Module:
    """The model of an Ultralytics ``.pt`` checkpoint, unpickled with ``weights_only=True`` and an allow-list, then
    prepared as ``ultralytics.nn.tasks.load_checkpoint`` prepares it (float32, eval, args, task, stride)."""
    path = Path(path)
    entries = safe_globals_for(path)
    try:
        with restricted_builds(), torch.serialization.safe_globals(entries):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a global the scan could not see, or a call the allow-list refused
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"'{path}' is not a plain Ultralytics checkpoint ({first}); refusing to unpickle it.") from e
    except TypeError as e:
        if "restricted" not in str(e):
            raise
        raise ValueError(f"'{path}' is not a plain Ultralytics checkpoint ({e}); refusing to load it.".replace(
            "\n", " ")) from e
    except (RuntimeError, EOFError, AttributeError) as e:
        raise ValueError(f"'{path}' is not a loadable Ultralytics checkpoint (corrupt or truncated?): "
                         f"{e}".replace("\n", " ")) from e
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"'{path}' holds no Ultralytics model (no 'model' or 'ema' module): pass a checkpoint "
                         "written by Ultralytics (model.save(), or a training run's weights/best.pt).")
    if ckpt.get("modelopt"):
        raise ValueError(f"'{path}' is a quantization-aware (QAT) checkpoint; visionpeft needs a float base model.")
    return prepare_loaded_model(model, ckpt.get("train_args"), path)


def load_base(source: str | Path | nn.Module, nc: int | None = None, **timm_kwargs) -> nn.Module:
    """The base model to adapt, in float32 and eval mode.

    ``source``: an Ultralytics ``.pt`` checkpoint (path or a name in the assets' weights), a model YAML
    (``yolo11n.yaml``, random weights, ``nc`` classes), ``timm:<model name>`` (``timm_kwargs`` go to
    ``timm.create_model``), a ViT detector ``vitdet:<timm name>`` or YAML with ``vitdet:`` (``timm_kwargs`` are
    its options: ``pretrained``, ``img_size``, ``width``, ...), or a module, returned as is.
    """
    if isinstance(source, nn.Module):
        return source
    s = str(source)
    if s.startswith("timm:"):
        import timm

        return timm.create_model(s[5:], **{"pretrained": False, **timm_kwargs}).eval()
    if s.startswith("vitdet:") or s.endswith((".yaml", ".yml")):
        return build_detector(s, nc=nc, **timm_kwargs).eval()
    model = load_checkpoint(resolve_weights(s))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_detector(cfg: str | Path | dict, nc: int | None = None, ch: int | None = None, **options) -> nn.Module:
    """A new detector from an architecture: an Ultralytics model YAML (or its dict), or a ViT detector spec
    (``vitdet:<timm name>``, or a YAML/dict with ``vitdet:``; ``options`` are its options)."""
    from .vitdet.model import is_vitdet

    if is_vitdet(cfg):
        from .vitdet.model import build_vitdet

        return build_vitdet(cfg, nc=nc, ch=ch, **options)
    if options:
        raise ValueError(f"Model options {sorted(options)} only apply to ViT detectors ('vitdet:<timm name>').")
    from ultralytics.nn.tasks import DetectionModel

    try:
        with restricted_builds():  # a YAML's activation and layer names would otherwise go through eval/globals()
            return DetectionModel(cfg, nc=nc, ch=ch or 3, verbose=False)
    except TypeError as e:
        if "restricted" not in str(e):
            raise
        raise ValueError(f"Model YAML '{cfg}' is refused: {e}".replace("\n", " ")) from e
