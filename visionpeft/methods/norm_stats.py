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
forward without that gradient diverges: crops benchmark, epoch 3). Since that forward is an affine map of the conv
before it, a model family may fold it into the conv's weight (:meth:`NormStatsAdapter.renorm_conv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .base import Adapter, AdapterConfig

NORMALIZE = ("batch", "renorm")


def channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an ``(N, C, ...)`` tensor. From row sums where ``y`` is contiguous:
    ``torch.var_mean`` over ``(0, 2, 3)`` is a strided reduction, 14x slower (2 threads, 16x64x64x64: 11.6 against
    0.8 ms). ``E[y^2] - E[y]^2`` loses precision where a channel's mean dwarfs its spread; on a BatchNorm's output,
    which ``renorm_conv`` takes it of, the spread is the norm's weight, and yolo11n's smallest weight is 1.2 % of
    its bias (relative error ~1e-3 in that channel's variance)."""
    if y.is_contiguous():
        v = y.view(y.shape[0], y.shape[1], -1)
        n = v.shape[0] * v.shape[2]
        mean = v.sum(-1).sum(0) / n
        return mean, (torch.linalg.vecdot(v, v).sum(0) / n - mean**2).clamp_min(0)
    if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last):
        v = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # a view: channels are the inner dimension
        mean = v.mean(0)
        return mean, (torch.linalg.vector_norm(v, dim=0) ** 2 / v.shape[0] - mean**2).clamp_min(0)
    var, mean = torch.var_mean(y, dim=[0, *range(2, y.dim())], correction=0)
    return mean, var


class _RenormAct(torch.autograd.Function):
    """``act(y)`` for a ``y`` already normalised by the running statistics (forward as eval); the backward pass is
    BatchNorm's with ``y``'s batch statistics, r and d constant (Ioffe 2017), the affine scale cancelled:
    ``g - mean(g) - y_hat * mean(g * y_hat)`` per channel. Saves ``y`` alone (the SiLU's input as well)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, silu: bool) -> torch.Tensor:
        ctx.save_for_backward(y, mean, invstd)
        ctx.silu = silu
        return F.silu(y) if silu else y.clone()  # a new tensor: Ultralytics' in-place SiLU must not edit the saved y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, mean, invstd = ctx.saved_tensors
        if ctx.silu:
            g = torch.ops.aten.silu_backward(g, y)
        # weight 1 / invstd: BatchNorm's backward multiplies by weight * invstd, here 1
        grad = torch.ops.aten.native_batch_norm_backward(g, y, invstd.reciprocal(), None, None, mean, invstd, True,
                                                         0.0, [True, False, False])[0]
        return grad, None, None, None


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

    @property
    def renormalizes(self) -> bool:
        """Whether the forward is now ``renorm``'s: an affine map with the running statistics."""
        return self.training and self.normalize == "renorm"

    def renorm_conv(self, base: nn.Module, conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor,
                    silu: bool) -> torch.Tensor | None:
        """``act(self(base, conv(x)))`` with ``weight`` as ``conv``'s, while ``renormalizes``: the normalisation
        folded into the conv (``weight * a``, bias ``c``), so the conv's output is the norm's, and the gradient from
        :class:`_RenormAct`. Against ``conv``, then this adapter, then the activation (crops recipe, yolo11n, batch
        16 at 256 px, 2 threads, steps alternated): 0.85x the step's time, one activation per conv less kept for the
        backward pass. ``None`` where the fold does not apply: a conv with its own bias, a norm without affine
        weights, or one whose weight is 0.1 % of its bias or less (``channel_moments``' precision)."""
        w_bn, b_bn = base.weight, base.bias
        if conv.bias is not None or w_bn is None or (w_bn.abs() <= 1e-3 * b_bn.abs()).any():
            return None
        momentum = base.momentum if base.momentum is not None else 0.1
        with torch.no_grad():
            a = w_bn * (self.running_var + base.eps).rsqrt()
            c = b_bn - self.running_mean * a
        y = conv._conv_forward(x, weight * a.view(-1, *[1] * (weight.dim() - 1)), c)
        with torch.no_grad():
            mean, var = channel_moments(y)
            invstd = (var + a**2 * base.eps).rsqrt()  # the conv output's eps, in y = a x + c's units
            n = y.numel() // y.shape[1]
            # the conv's own output is (y - c) / a: its statistics update the running ones, as BatchNorm's kernel does
            self.running_mean.lerp_((mean - c) / a, momentum)
            self.running_var.lerp_(var / a**2 * (n / max(n - 1, 1)), momentum)
        return _RenormAct.apply(y, mean, invstd, silu)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.running_mean.copy_(self.running_mean)
        base.running_var.copy_(self.running_var)
        return base

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        start = torch.stack([base.running_mean, base.running_var])
        self.stats.copy_(start + factor * (self.stats - start))
