"""Frozen BatchNorm as a constant per-channel affine map, for the layers a PEFT run does not train.

A frozen BatchNorm must use the base's running statistics (eval mode), or they drift toward the new data. Run as
``F.batch_norm`` it still keeps its whole input for the backward pass and runs ``native_batch_norm_backward``,
though its gradient is a per-channel scale. :class:`FrozenBatchNorm2d` computes ``x * scale + shift`` with
constant ``scale``/``shift``: autograd then saves no activation for it, the backward is one multiply, and the
statistics cannot move whatever ``train()``/``eval()`` a trainer calls. The idea is detectron2's and torchvision's
``FrozenBatchNorm2d``; this one is a ``BatchNorm2d`` subclass swapped in place (``__class__``), so state-dict keys,
``isinstance`` checks and Conv+BN fusion stay as they were.
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """Eval-mode ``BatchNorm2d`` with no trainable parameter: ``x * scale + shift``, nothing saved for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen by construction (see freeze_norms); no graph on the statistics
            scale = (self.running_var + self.eps).rsqrt()
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
            if self.bias is not None:
                shift = shift + self.bias
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale, shift = scale.reshape(shape).to(x.dtype), shift.reshape(shape).to(x.dtype)
        return torch.addcmul(shift, x, scale)


def is_frozen_norm(m: nn.Module) -> bool:
    """A BatchNorm2d with running statistics and no parameter that requires a gradient."""
    return (
        isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_var is not None
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    )


def freeze_norms(model: nn.Module) -> int:
    """Turn every frozen ``BatchNorm2d`` of ``model`` into a :class:`FrozenBatchNorm2d` (in place); returns how many.

    A norm whose parameters train again (or that was unfrozen by hand) goes back to a plain ``BatchNorm2d``.
    """
    n = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and is_frozen_norm(m):
            m.__class__ = FrozenBatchNorm2d
            n += 1
        elif type(m) is FrozenBatchNorm2d and not is_frozen_norm(m):
            m.__class__ = nn.BatchNorm2d
    return n


def unfreeze_norms(model: nn.Module) -> None:
    """Plain ``BatchNorm2d`` again everywhere (after merging, the model trains and runs like the base)."""
    for m in model.modules():
        if type(m) is FrozenBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
