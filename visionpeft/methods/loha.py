"""LoHa (Hyeon-Woo et al., 2022, FedPara; Hugging Face peft's ``LoHaConfig``): the update is the Hadamard product of
two low-rank products, ``s * (B1 A1) * (B2 A2)``, of rank up to ``r**2`` for the parameters of a rank-``2r`` LoRA.

Full fine-tuning's conv updates are not low-rank (README, "Benchmark": the top 8 singular directions hold about half
of each change), so LoHa reaches updates LoRA of the same size cannot. Each factor pair is a LoRA pair of the base's
geometry (``lora.low_rank_pair``), so grouped and depthwise convs, merging and file I/O work as for LoRA.
``use_dora`` (peft's LoRA option name) renormalises the adapted filters to a learned per-filter magnitude, as DoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .base import Adapter, AdapterConfig, WeightAdapter, full_precision
from .dora import channel_norm, scale_magnitude_
from .lora import compose_weight, functional_layer, group_rank, low_rank_pair


@dataclass
class LohaConfig(AdapterConfig):
    """LoHa options; ``alpha / r`` scales the update (peft's scaling)."""

    method = "loha"
    r: int = 4
    alpha: float = 8.0
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = checks.integer(self, "r", self.r, 1)
        self.alpha = checks.number(self, "alpha", self.alpha, "> 0", lambda v: v > 0)
        if not isinstance(self.use_dora, bool):
            raise checks.fail(self, "use_dora", "true or false", self.use_dora)

    def build(self, base: nn.Module, r: int) -> Adapter:
        return LohaAdapter(base, r=r, alpha=self.alpha, use_dora=self.use_dora)


class LohaAdapter(WeightAdapter):
    """``W' = W + s (B1 A1) * (B2 A2)`` (``B2 = 0`` at the start), optionally renormalised per filter (DoRA)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, use_dora: bool = False) -> None:
        super().__init__()
        self.r = group_rank(base, r)
        self.scaling = alpha / r
        self.w1_A, self.w1_B = low_rank_pair(base, self.r)
        self.w2_A, self.w2_B = low_rank_pair(base, self.r)  # w2_B = 0: the injected model equals the base
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.w1_B.weight, a=5 ** 0.5)
            # the first product at unit RMS: the update then moves as fast as a LoRA's under the same learning rate
            # (peft's draw gives entries ~1e-2, which Adam turns into a ~100x slower start)
            self.w1_B.weight.div_(compose_weight(self.w1_A, self.w1_B, base).square().mean().sqrt())
        self.magnitude = nn.Parameter(channel_norm(base.weight.detach()).clone()) if use_dora else None

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return compose_weight(self.w1_A, self.w1_B, base) * compose_weight(self.w2_A, self.w2_B, base) * self.scaling

    def adapted_weight(self, base: nn.Module) -> torch.Tensor:
        w = base.weight + self.delta_weight(base)
        if self.magnitude is None:
            return w
        return self.magnitude * w / channel_norm(w).clamp_min(1e-12)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            w = self.adapted_weight(base)
        return functional_layer(base, x, w)

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        """The update is linear in ``B2``; a DoRA magnitude moves toward the base's filter norms."""
        self.w2_B.weight.mul_(factor)
        if self.magnitude is not None:
            scale_magnitude_(self.magnitude, base, factor)

    def roundable_keys(self) -> tuple[str, ...]:
        return ("w1_A.weight", "w1_B.weight", "w2_A.weight", "w2_B.weight")  # not the magnitude
