"""Model families: what each kind of model needs beyond the generic injection (defaults, class outputs, inputs).

A family is found by ``family_of(model)``; the first family of ``FAMILIES`` that recognises the model wins. Families
import their library lazily (a model of a library can only exist once that library is imported).
"""

from __future__ import annotations

from .base import Family
from .vit import VitFamily
from .vitdet import VitDetFamily
from .yolo import YoloFamily

FAMILIES: list[Family] = [VitDetFamily(), YoloFamily(), VitFamily()]  # VitDet models are DetectionModels too


def family_of(model) -> Family:
    return next((f for f in FAMILIES if f.matches(model)), Family())


__all__ = ["FAMILIES", "Family", "VitDetFamily", "VitFamily", "YoloFamily", "family_of"]
