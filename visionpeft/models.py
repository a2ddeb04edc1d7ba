"""Build or load a base model by name or path: Ultralytics checkpoints and YAMLs, timm models.

Checkpoints are unpickled with ``torch.load(weights_only=True)``: only the globals a plain Ultralytics detector
needs (its layer classes, torch.nn layers, a few data types) are allowed, so a crafted ``.pt`` cannot run code.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import settings

#: modules whose ``nn.Module`` classes a base checkpoint may name
LAYER_MODULES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks")
#: plain data types a checkpoint may hold besides tensors (train args, metrics); torch allows the basic ones itself
DATA_GLOBALS = ("collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset",
                "builtins.slice", "builtins.range", "builtins.complex", "ultralytics.utils.IterableSimpleNamespace")


def resolve_weights(source: str | Path) -> Path:
    """A weights file given as a path, or as a bare name found in the assets' ``weights/`` folder."""
    p = Path(source).expanduser()
    candidates = [p] if p.is_absolute() or p.parent != Path(".") else [p, settings.weights_dir() / p.name]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(
        f"Base weights '{source}' not found (looked in: {looked}). Pass an existing path, or set "
        f"{settings.ASSETS_ENV} to the folder whose weights/ holds it."
    )


@contextlib.contextmanager
def restricted_builds() -> Iterator[None]:
    """Ultralytics' restricted model building: ``parse_model`` resolves a YAML's ``activation`` without ``eval``
    and accepts only ``nn.Module`` layers. Mirrors the thread flag ``ultralytics.nn.tasks._SafeLoad.loading`` sets
    (without its process-wide allow-list): a model class allowed in a checkpoint can be *called* by the pickle
    (REDUCE) with a crafted config, and a model YAML is a file a user may receive."""
    from ultralytics.nn import tasks

    safe = getattr(tasks, "_SafeLoad", None)
    if safe is None or not getattr(safe, "SUPPORTED", False):
        import ultralytics

        raise RuntimeError(f"Ultralytics {ultralytics.__version__} (or torch {torch.__version__}) has no restricted "
                           "model loading; upgrade both (pip install -U ultralytics torch) to load Ultralytics models.")
    previous = getattr(safe._local, "active", False)
    safe._local.active = True
    try:
        yield
    finally:
        safe._local.active = previous


def _restricted_getattr(obj, name: str):
    """``builtins.getattr`` as some Ultralytics checkpoints pickle it (``Detect.forward``), limited to layer
    attributes; mirrors ``_getattr`` in ``ultralytics.nn.tasks._SafeLoad._build``."""
    if isinstance(obj, type) and issubclass(obj, nn.Module) and not name.startswith("__"):
        return getattr(obj, name)
    if isinstance(obj, nn.Module) and name in {"forward", "forward_fuse"}:
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed in a checkpoint")


def _aliases() -> dict[str, object]:
    """Globals allowed under another name: Ultralytics' legacy paths (``torch_safe_load``'s ``temporary_modules``)
    and numpy's scalar/dtype reconstructors (metrics saved as numpy floats)."""
    import numpy as np
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]
    return {
        "builtins.getattr": _restricted_getattr,
        "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "ultralytics.nn.modules.block.Silence": nn.Identity,  # YOLOv9e
        "ultralytics.nn.tasks.YOLOv10DetectionModel": DetectionModel,
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
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT

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
    # as ultralytics.nn.tasks.load_checkpoint (8.4) does after torch_safe_load
    model = model.float()
    model.args = {**DEFAULT_CFG_DICT, **(ckpt.get("train_args") or {})}
    model.pt_path = str(path)
    model.task = getattr(model, "task", None) or guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model.eval()


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
