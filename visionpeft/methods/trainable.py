"""Modules trained in full, per adapter: a trainable copy, or a re-initialised replacement.

Used for a detector's class-output convs when the class count changes, and for modules the user names as
trainable (e.g. BatchNorm affine parameters). Each adapter owns its copy, so adapters stay switchable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .base import Adapter, AdapterConfig


@dataclass
class TrainableConfig(AdapterConfig):
    method = "trainable"

    def build(self, base: nn.Module, r: int) -> Adapter:
        return TrainableCopy(copy.deepcopy(base))


class TrainableCopy(Adapter):
    mergeable = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.module.requires_grad_(True)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def merge_into(self, base: nn.Module) -> nn.Module:
        return copy.deepcopy(self.module)

    def has_base_shape(self, base: nn.Module) -> bool:
        """False for a re-initialised replacement (a class output for other classes): it has no base to move to."""
        mine, start = self.module.state_dict(), base.state_dict()
        return mine.keys() == start.keys() and all(mine[k].shape == start[k].shape for k in mine)

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        """Every float tensor moved toward the base's."""
        if not self.has_base_shape(base):
            raise TypeError(f"A re-initialised {type(self.module).__name__} has no base to scale toward.")
        start = base.state_dict()
        for k, t in self.module.state_dict().items():
            if t.is_floating_point():
                t.copy_(start[k] + factor * (t - start[k]))
