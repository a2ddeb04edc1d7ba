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
    # a trainer leaves this method out for a train split of fewer images (0: always in): statistics re-estimated
    # from a few images are noisier than the base's (crops benchmark, 91 images: README "Across domains")
    min_images: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize not in NORMALIZE:
            raise checks.fail(self, "normalize", f"one of {list(NORMALIZE)}", self.normalize)
        self.min_images = checks.integer(self, "min_images", self.min_images, 0)

    def build(self, base: nn.Module, r: int) -> Adapter:
        return NormStatsAdapter(base, normalize=self.normalize)


class NormStatsAdapter(Adapter):
    mergeable = True

    def __init__(self, base: nn.Module, normalize: str = "batch") -> None:
        super().__init__()
        self.normalize = normalize
        if not isinstance(base, nn.modules.batchnorm._BatchNorm) or base.running_mean is None:
            raise TypeError(f"norm_stats adapts BatchNorm layers with running statistics, not {type(base).__name__}.")
        self.register_buffer("stats", torch.stack([base.running_mean, base.running_var]).detach().clone())

    @property
    def running_mean(self) -> torch.Tensor:
        return self.stats[0]  # a view: in-place updates land in ``stats``

    @property
    def running_var(self) -> torch.Tensor:
        return self.stats[1]

    def upgrade_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Files of the first build (2026-12-04) kept the two vectors as two tensors."""
        if "stats" not in sd and {"running_mean", "running_var"} <= set(sd):
            sd = dict(sd)
            sd["stats"] = torch.stack([sd.pop("running_mean"), sd.pop("running_var")])
        return sd

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        momentum = base.momentum if base.momentum is not None else 0.1
        if self.training and self.normalize == "renorm":
            return self._renorm(base, x, momentum)
        return F.batch_norm(x, self.running_mean, self.running_var, base.weight, base.bias, self.training,
                            momentum, base.eps)

    def _renorm(self, base: nn.Module, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """BatchNorm's output ``y`` (batch statistics, base weight and bias) mapped to ``((x - mean) / std * r + d)
        * weight + bias`` with ``r = std / running_std`` and ``d = (mean - running_mean) / running_std`` held
        constant: ``y * r + (weight * d + bias - bias * r)``. One pass of BatchNorm's own kernel, which returns the
        batch statistics and saves only its input for the backward pass (crops benchmark: separate tensor ops took
        1.25x full fine-tuning's time per epoch and 1.14x its peak RSS; 2 threads, a 64-channel 64 px map at batch
        16, forward and backward: 49 ms, a statistics pass before ``F.batch_norm`` 19 ms, this 9.7 ms, plain
        BatchNorm 7.2 ms)."""
        x, dtype = x.to(self.running_mean.dtype), x.dtype  # float32 statistics under AMP, as F.batch_norm keeps
        running_mean, running_std = self.running_mean.clone(), (self.running_var + base.eps).sqrt()
        # training mode: normalised by the batch's statistics, which update the running ones (unbiased variance)
        y, mean, invstd = torch.native_batch_norm(x, base.weight, base.bias, self.running_mean, self.running_var,
                                                  True, momentum, base.eps)
        with torch.no_grad():  # r, d: constants for the gradient (Ioffe 2017)
            r, d = 1 / (invstd * running_std), (mean - running_mean) / running_std
            shift = d if base.weight is None else base.weight * d + base.bias - base.bias * r
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), y, r.view(shape)).to(dtype)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.running_mean.copy_(self.running_mean)
        base.running_var.copy_(self.running_var)
        return base

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        start = torch.stack([base.running_mean, base.running_var])
        self.stats.copy_(start + factor * (self.stats - start))
