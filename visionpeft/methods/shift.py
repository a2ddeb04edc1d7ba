"""Per-channel shift (BitFit, Ben Zaken et al., 2022): a trainable bias added to a frozen BatchNorm's output.

Full fine-tuning moves every BatchNorm's bias; a low-rank update of a frozen conv can only approximate a constant
per-channel offset (through its input's mean). This adapter adds it explicitly: one vector per BatchNorm, zero at
the start (the base exactly), trained like any bias, folded into the BatchNorm's bias on merge. The statistics and
the affine weight stay the base's, so nothing is saved for its backward pass beyond what the base needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Adapter, AdapterConfig


@dataclass
class ShiftConfig(AdapterConfig):
    method = "shift"

    def build(self, base: nn.Module, r: int) -> Adapter:
        return ShiftAdapter(base)


class ShiftAdapter(Adapter):
    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.modules.batchnorm._BatchNorm) or base.bias is None:
            raise TypeError(f"shift adapts BatchNorm layers with a bias, not {type(base).__name__}.")
        self.bias = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base(x) + self.bias.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.bias.add_(self.bias.to(base.bias.dtype))
        return base

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        self.bias.mul_(factor)
