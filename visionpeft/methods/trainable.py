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
