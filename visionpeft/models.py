"""Build or load a base model by name or path: Ultralytics checkpoints and YAMLs, timm models."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import settings


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
    from ultralytics.nn.tasks import load_checkpoint

    path = resolve_weights(s)
    try:
        model, _ = load_checkpoint(str(path))
    except Exception as e:
        raise ValueError(f"'{path}' is not a loadable Ultralytics checkpoint (corrupt or truncated?): {e}") from e
    model = model.float().eval()
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

    return DetectionModel(cfg, nc=nc, ch=ch or 3, verbose=False)
