"""Bottleneck adapters added in parallel to a block: ``y = block(x) + scale * up(act(down(x)))``.

Two shapes of the same idea: a 1x1-conv adapter beside a CNN block (channels in, channels out, the block's stride),
and an AdaptFormer adapter (Chen et al., 2022) beside a transformer block's MLP, on token vectors. The up projection
starts at zero, so the injected model starts equal to the base. The adapter sees the block's input, not its output,
so it cannot be folded into the block's weights: these adapters do not merge and are exported as extra nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .base import Adapter, AdapterConfig, full_precision

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class BottleneckConfig(AdapterConfig):
    """``r`` is the hidden width; ``scale`` the initial value of the learnable output scale."""

    method = "bottleneck"
    r: int = 16
    act: str = "silu"
    scale: float = 1.0
    needs_shapes = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = checks.integer(self, "r", self.r, 1)
        if self.act not in ACTIVATIONS:
            raise checks.fail(self, "act", f"one of {sorted(ACTIVATIONS)}", self.act)
        # a zero scale times the zero-initialised up projection gives every adapter weight a zero gradient
        self.scale = checks.number(self, "scale", self.scale, "!= 0", lambda v: v != 0)

    def build(self, base: nn.Module, r: int, shapes: tuple[torch.Size, torch.Size]) -> Adapter:
        in_shape, out_shape = shapes
        if len(in_shape) == 4:
            stride = max(1, in_shape[-1] // out_shape[-1])
            return ConvBottleneck(in_shape[1], out_shape[1], r, stride, ACTIVATIONS[self.act](), self.scale)
        return TokenBottleneck(in_shape[-1], out_shape[-1], r, ACTIVATIONS[self.act](), self.scale)


class ParallelAdapter(Adapter):
    """Shared forward: the block's output plus the scaled bottleneck of its input."""

    def __init__(self, down: nn.Module, up: nn.Module, act: nn.Module, scale: float) -> None:
        super().__init__()
        self.down, self.act, self.up = down, act, up
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            delta = self.scale * self.up(self.act(self.down(x.float())))
        return base(x) + delta

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        self.scale.mul_(factor)


class ConvBottleneck(ParallelAdapter):
    def __init__(self, c_in: int, c_out: int, hidden: int, stride: int, act: nn.Module, scale: float) -> None:
        k = 1 if stride == 1 else 3
        down = nn.Conv2d(c_in, hidden, k, stride, padding=k // 2)
        super().__init__(down, nn.Conv2d(hidden, c_out, 1), act, scale)


class TokenBottleneck(ParallelAdapter):
    """AdaptFormer: Linear down, activation, Linear up, on the last (feature) dimension."""

    def __init__(self, d_in: int, d_out: int, hidden: int, act: nn.Module, scale: float) -> None:
        super().__init__(nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), act, scale)
