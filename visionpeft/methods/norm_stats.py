"""Per-adapter BatchNorm statistics (AdaBN, Li et al., 2016): the new domain's feature means and variances.

Full fine-tuning re-estimates every BatchNorm's statistics on the new data, frozen-BN PEFT keeps the base's. This
adapter keeps its own ``running_mean``/``running_var`` for one BatchNorm and, in train mode, normalises with the
batch statistics and updates them, exactly as the base layer would; the affine weight and bias stay the base's.
Nothing is trainable, so a layer adapted only this way costs no backward pass: statistics are a forward-only
update. The adapter file holds two vectors per BatchNorm, and the base layer's own statistics never move.
The update uses the base layer's ``momentum`` (0.03 in Ultralytics models; 0.1 where it is ``None``).

``normalize="renorm"`` (Batch Renormalization, Ioffe 2017, without clipping) normalises in training with the
running statistics as they stand before the batch updates them, while the gradient flows through the batch's
statistics as in BatchNorm: training's forward is eval's, so training starts as the frozen-BatchNorm recipe and
what is learnt on few images is what is evaluated, and the gradient still holds the activations' scale (the same
forward without that gradient diverges: crops benchmark, epoch 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .base import Adapter, AdapterConfig

NORMALIZE = ("batch", "renorm")


@dataclass
class NormStatsConfig(AdapterConfig):
    method = "norm_stats"
    # what training normalises with: "batch" statistics (AdaBN, as full fine-tuning) or "renorm", the running ones
    # with BatchNorm's gradient (Batch Renormalization)
    normalize: str = "batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize not in NORMALIZE:
            raise checks.fail(self, "normalize", f"one of {list(NORMALIZE)}", self.normalize)

    def build(self, base: nn.Module, r: int) -> Adapter:
        return NormStatsAdapter(base, normalize=self.normalize)


class NormStatsAdapter(Adapter):
    mergeable = True

    def __init__(self, base: nn.Module, normalize: str = "batch") -> None:
        super().__init__()
        self.normalize = normalize
        if not isinstance(base, nn.modules.batchnorm._BatchNorm) or base.running_mean is None:
            raise TypeError(f"norm_stats adapts BatchNorm layers with running statistics, not {type(base).__name__}.")
        self.register_buffer("running_mean", base.running_mean.detach().clone())
        self.register_buffer("running_var", base.running_var.detach().clone())

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        momentum = base.momentum if base.momentum is not None else 0.1
        if self.training and self.normalize == "renorm":
            return self._renorm(base, x, momentum)
        return F.batch_norm(x, self.running_mean, self.running_var, base.weight, base.bias, self.training,
                            momentum, base.eps)

    def _renorm(self, base: nn.Module, x: torch.Tensor, momentum: float) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x, dtype = x.to(self.running_mean.dtype), x.dtype  # float32 statistics under AMP, as F.batch_norm keeps
        var, mean = torch.var_mean(x, dims, correction=0)
        std = (var + base.eps).sqrt()
        with torch.no_grad():  # r, d: constants for the gradient (Ioffe 2017)
            running_std = (self.running_var + base.eps).sqrt()
            r, d = std / running_std, (mean - self.running_mean) / running_std
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), momentum)
        y = (x - mean.view(shape)) * (r / std).view(shape) + d.view(shape)
        if base.weight is not None:
            y = y * base.weight.view(shape) + base.bias.view(shape)
        return y.to(dtype)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.running_mean.copy_(self.running_mean)
        base.running_var.copy_(self.running_var)
        return base

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        for mine, start in ((self.running_mean, base.running_mean), (self.running_var, base.running_var)):
            mine.copy_(start + factor * (mine - start))
