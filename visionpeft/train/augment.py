"""Albumentations transforms from YAML, handed to Ultralytics' own Albumentations hook (the ``augmentations`` arg).

Ultralytics applies them inside its training pipeline, after mosaic and the random affine (boxes follow spatial
transforms), so nothing of its pipeline is replaced. A list replaces Ultralytics' default albumentations list
(Blur, MedianBlur, ToGray, CLAHE at p=0.01); ``[]`` turns them off; no ``augmentations`` keeps them.

YAML form, one transform per item; a bare name takes the transform's defaults::

    augmentations:
      - RandomBrightnessContrast: {brightness_limit: 0.25, contrast_limit: 0.2, p: 0.5}
      - OneOf: {p: 0.3, transforms: [MotionBlur: {blur_limit: 7}, GaussianBlur: {blur_limit: [3, 5]}]}
      - ISONoise

Transforms go to Ultralytics as ``A.to_dict`` dicts, which its checkpoints store, so ``resume`` keeps them.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

COMPOSES = ("OneOf", "SomeOf", "Sequential")
# Not usable inside Ultralytics' pipeline: base classes, dtype/layout changes, and transforms needing extra inputs
# (reference images, masks, metadata) or user code that checkpoints cannot store.
UNSUITABLE = {"BasicTransform", "DualTransform", "ImageOnlyTransform", "NoOp", "Lambda", "ToTensorV2", "Normalize",
              "ToFloat", "FromFloat", "Mosaic", "OverlayElements", "TextImage", "FDA", "HistogramMatching",
              "PixelDistributionAdaptation", "MaskDropout", "CropNonEmptyMaskIfExists", "RandomCropNearBBox"}


def _albumentations():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would otherwise check PyPI for a newer version
    import albumentations as A

    return A


def transform_names() -> list[str]:
    """The albumentations transforms a config may name."""
    A = _albumentations()
    return sorted(n for n in dir(A) if isinstance(getattr(A, n), type) and n not in UNSUITABLE and "3D" not in n
                  and issubclass(getattr(A, n), (A.ImageOnlyTransform, A.DualTransform)))


def _split(item: Any, where: str) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and len(item) == 1:
        name, kwargs = next(iter(item.items()))
        if kwargs is None:
            kwargs = {}
        if isinstance(name, str) and isinstance(kwargs, dict):
            return name, dict(kwargs)
    raise ValueError(f"{where}: expected a transform name or '{{Name: {{arg: value}}}}', got {item!r}.")


def build_transform(item: Any, where: str = "augmentations") -> Any:
    """One albumentations transform (or OneOf/SomeOf/Sequential) from its YAML item, with checked arguments."""
    A = _albumentations()
    name, kwargs = _split(item, where)
    where = f"{where} {name}"
    names = transform_names()
    cls = getattr(A, name, None)
    if name not in names and name not in COMPOSES:
        close = difflib.get_close_matches(name, names + list(COMPOSES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"{where}: unknown albumentations transform.{hint} Valid: {[*COMPOSES, *names]}.")
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in {"self", "args", "kwargs"}]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown argument(s) {unknown}. Valid arguments: {valid}.")
    if name in COMPOSES:
        children = kwargs.get("transforms")
        if not isinstance(children, list) or not children:
            raise ValueError(f"{where}: needs 'transforms:', a non-empty list of transforms.")
        kwargs["transforms"] = [build_transform(c, f"{where}.transforms[{i}]") for i, c in enumerate(children)]
    try:
        return cls(**kwargs)
    except Exception as e:  # albumentations validates values with pydantic
        raise ValueError(f"{where}: invalid arguments {kwargs}: {e}") from e


def build_transforms(spec: list | None) -> list | None:
    """The transforms of an ``augmentations`` list (``None``: keep Ultralytics' defaults)."""
    if spec is None:
        return None
    if not isinstance(spec, list):
        raise ValueError(f"augmentations must be a list of transforms, not {type(spec).__name__}.")
    return [build_transform(item, f"augmentations[{i}]") for i, item in enumerate(spec)]


def to_ultralytics(spec: list | None) -> list[dict] | None:
    """The value of Ultralytics' ``augmentations`` train arg: serialisable ``A.to_dict`` dicts."""
    transforms = build_transforms(spec)
    if transforms is None:
        return None
    A = _albumentations()
    return [A.to_dict(t) for t in transforms]
