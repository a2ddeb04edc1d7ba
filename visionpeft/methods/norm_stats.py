"""Per-adapter BatchNorm statistics (AdaBN, Li et al., 2016): the new domain's feature means and variances.

Full fine-tuning re-estimates every BatchNorm's statistics on the new data, frozen-BN PEFT keeps the base's. This
adapter keeps its own ``running_mean``/``running_var`` for one BatchNorm and, in train mode, normalises with the
batch statistics and updates them, exactly as the base layer would; the affine weight and bias stay the base's.
Nothing is trainable, so a layer adapted only this way costs no backward pass: statistics are a forward-only
update. The adapter file holds two vectors per BatchNorm, and the base layer's own statistics never move.
The update uses the base layer's ``momentum`` (0.03 in Ultralytics models; 0.1 where it is ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, AdapterConfig


@dataclass
class NormStatsConfig(AdapterConfig):
    method = "norm_stats"

    def build(self, base: nn.Module, r: int) -> Adapter:
        return NormStatsAdapter(base)


class NormStatsAdapter(Adapter):
    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, nn.modules.batchnorm._BatchNorm) or base.running_mean is None:
            raise TypeError(f"norm_stats adapts BatchNorm layers with running statistics, not {type(base).__name__}.")
        self.register_buffer("running_mean", base.running_mean.detach().clone())
        self.register_buffer("running_var", base.running_var.detach().clone())

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, base.weight, base.bias, self.training,
                            base.momentum if base.momentum is not None else 0.1, base.eps)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.running_mean.copy_(self.running_mean)
        base.running_var.copy_(self.running_var)
        return base

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        for mine, start in ((self.running_mean, base.running_mean), (self.running_var, base.running_var)):
            mine.copy_(start + factor * (mine - start))
