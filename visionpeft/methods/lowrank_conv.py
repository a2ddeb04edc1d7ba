"""LoRA and DoRA on a frozen ``nn.Conv2d`` as one conv forward and a backward without the full weight gradient.

The conv counterpart of :mod:`.lowrank_linear`. Forward: one conv with the composed weight ``W' = W + s B A``
(LoRA) or ``m * V / ||V||`` with ``V = W + s B A`` (DoRA, norms per output filter), as the unfused path computes
it. Autograd through that composition would form the full weight gradient ``dW'`` (as many FLOPs as the forward
conv, what full fine-tuning pays); the adapter only needs it through thin products: with ``h = c * g`` (``c = m /
||V||``, DoRA's per-filter scale, 1 for LoRA), ``dB = s h (*) A(x)`` (a 1x1 weight gradient on the r-channel
``A(x)``) and ``dA = s B^T h (*) x`` (the weight gradient of the r-channel conv ``A``), less DoRA's per-filter
projection, which takes ``dm = sum g * (y - bias) / m`` from the output instead of another conv. ``A`` and ``B``
keep the grouped geometry of :func:`.lora.low_rank_pair` (``A``: the base's kernel, stride, padding, dilation and
groups; ``B``: grouped 1x1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_grads(gy, x, w, stride, padding, dilation, groups, mask):
    """``aten.convolution_backward`` for a conv without bias: (input gradient, weight gradient), as ``mask`` asks."""
    gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                                    [mask[0], mask[1], False])
    return gx, gw


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight as (groups, rows per group, fan-in)."""
    return t.reshape(groups, t.shape[0] // groups, -1)


class _LowRankConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, magnitude, stride, padding, dilation, groups):
        v = weight + torch.bmm(_grouped(b, groups), _grouped(a, groups)).reshape(weight.shape) * scaling
        c = None
        if magnitude is not None:
            c = magnitude / v.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(magnitude.shape)
            v = c * v
        y = F.conv2d(x, v, bias, stride, padding, dilation, groups)
        ctx.geometry = (scaling, stride, padding, dilation, groups)
        ctx.save_for_backward(x, v, a, b, c, magnitude, y if magnitude is not None else None, bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, c, magnitude, y, bias = ctx.saved_tensors
        s, stride, padding, dilation, groups = ctx.geometry
        need_x, _, need_bias, need_a, need_b, _, need_m = ctx.needs_input_grad[:7]
        gx = _conv_grads(gy, x, w, stride, padding, dilation, groups, (True, False))[0] if need_x else None
        gbias = gy.sum((0, 2, 3)) if need_bias else None
        ga = gb = gm = cd = None
        if magnitude is not None:  # x V^ = (y - bias) / m per filter, so dm = sum g (y - bias) / m
            yb = y if bias is None else y - bias.reshape(1, -1, 1, 1)
            dm = torch.einsum("nchw,nchw->c", gy, yb) / magnitude.reshape(-1)
            gm = dm.reshape(magnitude.shape) if need_m else None
            cd = c.reshape(-1) * dm  # dV = c dW' - c dm V^, per filter
        if need_a or need_b:
            xa = F.conv2d(x, a, None, stride, padding, dilation, groups)  # A(x): r channels per group
            # c folds into B's rows (B^T c g) and into dB's rows (c (g (*) A(x))): no pass over c * g
            gxa, gb = _conv_grads(gy, xa, b if c is None else c * b, (1, 1), (0, 0), (1, 1), groups, (need_a, need_b))
            if gb is not None and c is not None:
                gb = gb * c
            if need_a:
                ga = _conv_grads(gxa, x, a, stride, padding, dilation, groups, (False, True))[1]
        if cd is not None:  # DoRA's projection: dA -= s (cd B)^T V^, dB -= s cd (V^ A^T), per group
            v_hat = _grouped(w / magnitude, groups)
            bg, ag = _grouped(b, groups), _grouped(a, groups)
            cdg = cd.reshape(groups, -1, 1)
            if need_a:
                ga = ga - torch.bmm((cdg * bg).transpose(1, 2), v_hat).reshape(a.shape)
            if need_b:
                gb = gb - (cdg * torch.bmm(v_hat, ag.transpose(1, 2))).reshape(b.shape)
        ga = ga * s if ga is not None else None
        gb = gb * s if gb is not None else None
        return gx, None, gbias, ga, gb, None, gm, None, None, None, None


def lowrank_conv(x: torch.Tensor, base: nn.Conv2d, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scaling: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``base``'s conv with LoRA's ``W' = weight + s B A`` or, with ``magnitude``, DoRA's; ``weight`` gets no
    gradient (the base is frozen), the adapter's factors, magnitude and the input do."""
    return _LowRankConv.apply(x, weight, base.bias, a, b, float(scaling), magnitude, base.stride, base.padding,
                              base.dilation, base.groups)


def fusable_conv(base: nn.Module, x: torch.Tensor, r: int) -> bool:
    """Whether :func:`lowrank_conv` computes the adapter's output here and is the faster backward: a frozen fp32
    ungrouped ``k x k`` conv (k > 1) with at least ``8 r`` input and output channels, outside autocast."""
    return (isinstance(base, nn.Conv2d) and base.groups == 1 and base.kernel_size != (1, 1)
            and isinstance(base.padding, tuple) and base.padding_mode == "zeros"
            and min(base.in_channels, base.out_channels) >= 8 * r and not base.weight.requires_grad
            and x.dtype == base.weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type))
