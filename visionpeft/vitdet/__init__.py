"""ViT-backbone detectors: a timm Vision Transformer, a ViTDet simple feature pyramid and the Ultralytics head.

Build one with ``visionpeft.load_base("vitdet:vit_small_patch16_224", nc=2, pretrained="vit_s.safetensors")`` or
train one from a config with ``model: vitdet:<timm name>``. Importing this package imports Ultralytics.
"""

from .backbone import TimmViTBackbone, create_vit, hub_offline
from .model import PyramidLevel, VitDetModel, VitDetSpec, build_vitdet, is_vitdet, parse_spec

__all__ = ["PyramidLevel", "TimmViTBackbone", "VitDetModel", "VitDetSpec", "build_vitdet", "create_vit", "hub_offline",
           "is_vitdet", "parse_spec"]
