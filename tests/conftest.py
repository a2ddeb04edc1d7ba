"""Shared fixtures: real base models loaded once per session (deep-copied per test) and output comparisons.

Models are tiny real networks: Ultralytics YAML builds and the COCO-pretrained checkpoints from the assets
(``$VISIONPEFT_ASSETS`` or ``../shared/assets``), and a timm ViT with random weights at 64 px. Nothing is downloaded.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.inject import adapted_modules

IMGSZ = 64
VIT = "timm:vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": IMGSZ, "num_classes": 5}


@pytest.fixture(scope="session")
def _bases() -> dict:
    return {}


@pytest.fixture
def base(_bases: dict) -> Callable[..., nn.Module]:
    """``base("yolo11n.pt")`` / ``base("yolo11n.yaml", nc=3)`` / ``base(VIT, **VIT_KWARGS)``: a fresh copy."""

    def get(source: str, **kwargs) -> nn.Module:
        key = (source, tuple(sorted(kwargs.items())))
        if key not in _bases:
            torch.manual_seed(0)
            _bases[key] = vp.load_base(source, **kwargs)
        return copy.deepcopy(_bases[key])

    return get


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))


def leaves(out) -> list[torch.Tensor]:
    """Every tensor in a model output (Ultralytics returns nested tuples, lists and dicts)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return leaves(model.eval()(x))


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference between matching output tensors, relative to each tensor's scale (max abs value)."""
    assert len(a) == len(b) and a, "outputs differ in structure"
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape, f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = x.abs().max().clamp_min(1e-12)
        worst = max(worst, float((x - y).abs().max() / scale))
    return worst


def randomize_adapters(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter of the model non-zero tensors (LoRA ``B`` and bottleneck ``up`` start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, wrapper in adapted_modules(model):
            for adapter in wrapper.adapters.values():
                for name, p in adapter.named_parameters():
                    if name.endswith(("lora_B.weight", "up.weight", "up.bias")):
                        p.copy_(torch.randn(p.shape, generator=g) * std)
                    elif name == "magnitude":  # DoRA: move the magnitudes off the base norms too
                        p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def visionpeft_modules(model: nn.Module) -> list[str]:
    """Names of modules whose class comes from visionpeft (a merged model must have none)."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("visionpeft")]
