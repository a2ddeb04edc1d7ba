"""DoRA (Liu et al., 2024): LoRA on the direction of each output filter, with a learned magnitude.

``W' = m * (W + s * B A) / ||W + s * B A||``, the norm taken per output channel. The adapted weight is computed
and used directly, so merging is exact by construction; it works for every conv geometry LoRA supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Adapter, WeightAdapter, full_precision
from .lora import (
    LoraAdapter,
    LoraConfig,
    compose_weight,
    functional_layer,
    group_rank,
    low_rank_keys,
    low_rank_pair,
    principal_init,
    scale_low_rank_,
    start_weight,
)
from .lowrank_linear import fusable, lowrank_linear


@dataclass
class DoraConfig(LoraConfig):
    method = "dora"

    def build(self, base: nn.Module, r: int) -> Adapter:
        return DoraAdapter(base, r=r, alpha=self.alpha, init=self.init)


def channel_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel's filter, shaped to broadcast against ``w``."""
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def scale_magnitude_(magnitude: torch.Tensor, base: nn.Module, factor: float) -> None:
    """Move per-filter magnitudes toward the base's filter norms (at 0: ``||W|| W / ||W|| = W``)."""
    start = channel_norm(base.weight.detach()).to(magnitude.dtype)
    magnitude.copy_(start + factor * (magnitude - start))


class DoraAdapter(WeightAdapter):
    """``W' = m (W + s B A) / ||W + s B A||``, the norm per output filter."""

    def __init__(self, base: nn.Module, r: int, alpha: float, init: str = "zero") -> None:
        super().__init__()
        self.r = group_rank(base, r)
        self.scaling = alpha / r
        self.lora_A, self.lora_B = low_rank_pair(base, self.r)
        self.magnitude = nn.Parameter(channel_norm(base.weight.detach()).clone())
        self.init = init
        if init == "pissa":
            principal_init(self, base)

    def adapted_weight(self, base: nn.Module) -> torch.Tensor:
        w = start_weight(self, base) + compose_weight(self.lora_A, self.lora_B, base) * self.scaling
        return self.magnitude * w / channel_norm(w).clamp_min(1e-12)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if fusable(base, x):  # no full weight gradient in the backward pass
            return lowrank_linear(x, start_weight(self, base), base.bias, self.lora_A.weight, self.lora_B.weight,
                                  self.scaling, self.magnitude)
        with full_precision(x):  # the per-filter norm of a fp16 weight loses the small LoRA update
            w = self.adapted_weight(base)
        return functional_layer(base, x, w)

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        """Direction and magnitude each moved toward the base's."""
        scale_low_rank_(self, factor)
        scale_magnitude_(self.magnitude, base, factor)

    def roundable_keys(self) -> tuple[str, ...]:
        return low_rank_keys(self)  # not the magnitude: it scales the whole filter

    before_rounding = LoraAdapter.before_rounding  # the same factors
