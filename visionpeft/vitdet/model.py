"""The ViT detector: timm ViT backbone -> ViTDet simple feature pyramid (P3/P4/P5) -> Ultralytics ``Detect``.

``VitDetModel`` is an Ultralytics ``DetectionModel`` whose ``model`` is an ``nn.Sequential`` of layers carrying
Ultralytics' routing attributes (``i``, ``f``, ``type``), like one parsed from a YAML. So Ultralytics' forward, loss,
trainer, validator, predictor, checkpoints and exporter handle it unchanged. The pyramid follows ViTDet (Li et al.,
2022): from the single stride-16 map of the last ViT block, transposed convs up to stride 8, identity at 16, max
pooling down to 32, each followed by a 1x1 and a 3x3 conv to the head's width.

The model is described by a :class:`VitDetSpec`, stored as ``model.yaml["vitdet"]``; its random parts (pyramid, head,
a ViT without weights) are drawn from a fixed seed, so the same spec always rebuilds the same base model, and an
adapter file trained on it loads onto a fresh build (the fingerprint matches). ONNX exports have a fixed input
size (any size; the position embeddings are resampled for it), not dynamic axes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules import Conv, ConvTranspose, Detect
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER, YAML
from ultralytics.utils.torch_utils import initialize_weights

from ..integrations.ultralytics import modern_detect_head
from .backbone import TimmViTBackbone, backbone_stride, create_vit

PREFIX = "vitdet:"
LEVEL_STRIDES = (8, 16, 32)  # P3, P4, P5: the strides the Ultralytics head and its loss are tuned for


@dataclass
class VitDetSpec:
    """What a ViT detector is built from; the same spec always builds the same base model.

    backbone: timm model name (``vit_small_patch16_224``, ``deit_tiny_patch16_224``, ``vit_small_patch14_reg4_dinov2``).
    pretrained: weights file path (or a name in the assets' ``weights/``), ``True`` for timm's pretrained weights
        (assets' ``weights/<name>.safetensors``, the Hugging Face cache, or the hub when ``HF_HUB_OFFLINE=0``),
        ``False`` for random weights.
    img_size: the grid the position embeddings are resampled to once at build (``None``: the pretrained size);
        any input size works, its embeddings are interpolated from this grid at run time.
    patch_size: override the patch size (``None``: the model's own; non-power-of-two patches become 16).
    width: channels of the pyramid levels and the head input.
    nc, in_chans: class count of the head and input channels (the trainer sets them from the dataset).
    seed: seeds the random parts (pyramid, head, a ViT without weights).
    timm_kwargs: more ``timm.create_model`` arguments (``drop_path_rate``; ``depth``/``embed_dim`` for tiny tests).
    """

    backbone: str
    pretrained: bool | str = True
    img_size: int | None = None
    patch_size: int | None = None
    width: int = 128
    nc: int = 80
    in_chans: int = 3
    seed: int = 0
    timm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VitDetSpec:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"Unknown ViT detector option(s) {unknown}. Valid options: {valid}.")
        if not d.get("backbone"):
            raise ValueError("A ViT detector needs a timm backbone: 'vitdet:<timm name>' or vitdet: {backbone: ...}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def source(self) -> str:
        """The spec as one string ``load_base`` rebuilds it from: ``vitdet:<name>``, or ``vitdet:{json}`` with the
        options that differ from the defaults (recorded as the ``base`` of adapter files)."""
        defaults = VitDetSpec(self.backbone).to_dict()
        changed = {k: v for k, v in self.to_dict().items() if v != defaults[k]}
        return PREFIX + (json.dumps({"backbone": self.backbone, **changed}) if changed else self.backbone)


def _yaml_dict(cfg: Any) -> dict | None:
    if isinstance(cfg, dict):
        return cfg
    if isinstance(cfg, (str, Path)) and str(cfg).endswith((".yaml", ".yml")) and Path(cfg).is_file():
        return YAML.load(cfg)
    return None


def is_vitdet(cfg: Any) -> bool:
    """Whether ``cfg`` describes a ViT detector: ``"vitdet:<timm name>"``, or a dict / YAML file with ``vitdet:``."""
    if isinstance(cfg, VitDetSpec) or (isinstance(cfg, str) and cfg.startswith(PREFIX)):
        return True
    d = _yaml_dict(cfg)
    return d is not None and "vitdet" in d


def parse_spec(cfg: str | Path | dict | VitDetSpec, **options: Any) -> VitDetSpec:
    """The spec a config gives; ``options`` override its fields.

    ``cfg``: ``"vitdet:<timm name>"``, ``'vitdet:{"backbone": ..., "width": 64}'``, a spec, or a dict / YAML file
    with a ``vitdet:`` mapping (a built model's ``model.yaml`` is one; a top-level ``nc:`` is the class count).
    """
    if isinstance(cfg, VitDetSpec):
        return dataclasses.replace(cfg, **options)
    if isinstance(cfg, str) and cfg.startswith(PREFIX):
        text = cfg[len(PREFIX):].strip()
        if text.startswith("{"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"'{cfg}' is not a valid ViT detector spec (JSON after 'vitdet:'): {e}") from e
        else:
            spec = {"backbone": text}
        return VitDetSpec.from_dict({**spec, **options})
    d = _yaml_dict(cfg)
    if d is None or "vitdet" not in d:
        raise ValueError(f"'{cfg}' is not a ViT detector config: use 'vitdet:<timm name>' or a YAML with 'vitdet:'.")
    v = d["vitdet"]
    spec = {"backbone": v} if isinstance(v, str) else dict(v)
    if "nc" in d and "nc" not in spec:
        spec["nc"] = d["nc"]
    return VitDetSpec.from_dict({**spec, **options})


class PyramidLevel(nn.Module):
    """One level of the simple feature pyramid: resample the ViT map by ``scale`` (a power of two), then 1x1 + 3x3.

    Up-sampling uses 2x2 stride-2 transposed convs, each halving the width (ViTDet); down-sampling 2x2 max pooling.
    Convs carry BatchNorm and SiLU (Ultralytics ``Conv``), so ``fuse()`` folds them for export.
    """

    def __init__(self, c_in: int, c_out: int, scale: float) -> None:
        super().__init__()
        steps = round(math.log2(scale))
        if 2.0 ** steps != scale:
            raise ValueError(f"Pyramid scale {scale} is not a power of two.")
        layers: list[nn.Module] = []
        c = c_in
        for _ in range(steps):
            layers.append(ConvTranspose(c, max(c // 2, 1), 2, 2))
            c = max(c // 2, 1)
        layers += [nn.MaxPool2d(2) for _ in range(-steps)]
        layers += [Conv(c, c_out, 1), Conv(c_out, c_out, 3)]
        self.scale = scale
        self.m = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def new_detect_head(nc: int, ch: list[int]) -> Detect:
    """The YOLO11-style ``Detect`` head (depthwise class branch) regardless of what YAML was parsed last."""
    return modern_detect_head(nc, ch, reg_max=16, end2end=False)


def _layer(module: nn.Module, i: int, f: int | list[int]) -> nn.Module:
    """Attach the routing attributes ``BaseModel._predict_once`` and Ultralytics' tools read."""
    module.i, module.f, module.type = i, f, type(module).__name__
    module.np = sum(p.numel() for p in module.parameters())
    return module


class VitDetModel(DetectionModel):
    """A ``DetectionModel`` with a timm ViT backbone and a simple feature pyramid (see the module docstring).

    ``cfg``: ``"vitdet:<timm name>"``, a dict or YAML file with a ``vitdet:`` mapping (``model.yaml`` of a built
    model is one), or a :class:`VitDetSpec`; ``options`` override spec fields (``pretrained``, ``img_size``, ...).
    """

    task = "detect"  # Ultralytics sets this on models it loads from checkpoints; the exporter reads it

    def __init__(self, cfg: str | Path | dict | VitDetSpec, ch: int | None = None, nc: int | None = None,
                 verbose: bool = False, **options: Any) -> None:
        nn.Module.__init__(self)  # not DetectionModel.__init__: there is no Ultralytics YAML to parse
        spec = parse_spec(cfg, **options)
        spec = dataclasses.replace(spec, nc=int(nc or spec.nc), in_chans=int(ch or spec.in_chans))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            stride, patch_size = backbone_stride(spec.backbone, spec.patch_size, spec.timm_kwargs)
            vit, source = create_vit(spec.backbone, pretrained=spec.pretrained, img_size=spec.img_size,
                                     patch_size=patch_size, in_chans=spec.in_chans, timm_kwargs=spec.timm_kwargs)
            backbone = TimmViTBackbone(vit, stride, spec.in_chans)
            levels = [PyramidLevel(backbone.out_channels, spec.width, stride / s) for s in LEVEL_STRIDES]
            head = new_detect_head(spec.nc, [spec.width] * len(levels))
        n = len(levels)
        self.model = nn.Sequential(
            _layer(backbone, 0, -1), *(_layer(m, 1 + k, 0) for k, m in enumerate(levels)),
            _layer(head, n + 1, list(range(1, n + 1))),
        )
        self.save = list(range(n + 1))
        nc = spec.nc
        self.yaml = {
            "vitdet": spec.to_dict(), "nc": nc, "channels": spec.in_chans,
            "yaml_file": f"vitdet-{spec.backbone.replace('/', '_').replace(':', '_')}.yaml",
            "backbone": [[-1, 1, "TimmViTBackbone", [spec.backbone, stride]]],
            "head": [*([0, 1, "PyramidLevel", [spec.width, stride / s]] for s in LEVEL_STRIDES),
                     [list(range(1, n + 1)), 1, "Detect", ["nc"]]],
        }
        self.names = {i: f"{i}" for i in range(nc)}
        self.inplace = True
        head.inplace = True
        head.stride = torch.tensor([float(s) for s in LEVEL_STRIDES])
        self.stride = head.stride
        head.bias_init()
        initialize_weights(self.model[1:])  # Ultralytics' BatchNorm settings, for the new layers only (not the ViT's)
        LOGGER.info(f"visionpeft: ViT detector on {spec.backbone} (weights: {source}), stride {stride} -> P3/P4/P5, "
                    f"{spec.width} channels, {nc} classes")
        if verbose:
            self.info()

    def predict(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """Ultralytics' forward; refuses a dynamic-size ONNX export, whose graph would be wrong at other sizes."""
        if torch.onnx.is_in_onnx_export() and getattr(self.model[-1], "dynamic", False):
            raise ValueError("ViT detectors export to ONNX at a fixed input size: their position embeddings are "
                             "resampled to the export size. Export with dynamic=False (one file per input size).")
        return super().predict(x, *args, **kwargs)

    @property
    def spec(self) -> VitDetSpec:
        return VitDetSpec.from_dict(self.yaml["vitdet"])

    def fuse(self, verbose: bool = True, imgsz: int = 640):
        """Merge adapters first (Ultralytics val/predict/export fuse models; Conv+BN folding must see plain convs)."""
        if getattr(self, "visionpeft", None) is not None:
            from ..families.vitdet import VitDetFamily

            VitDetFamily().merge_(self)
        return super().fuse(verbose=verbose, imgsz=imgsz)


def build_vitdet(cfg: str | Path | dict | VitDetSpec, nc: int | None = None, ch: int | None = None,
                 **options: Any) -> VitDetModel:
    """Build a ViT detector from ``"vitdet:<timm name>"``, a ``vitdet:`` dict/YAML or a spec (see VitDetModel)."""
    return VitDetModel(cfg, ch=ch, nc=nc, **options)
