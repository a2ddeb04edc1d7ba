"""LoRA and DoRA on a frozen ``nn.Linear`` as one matmul forward and a backward without the full weight gradient.

Forward: ``y = x W'^T + b`` with the composed weight ``W' = W + s B A`` (LoRA) or ``m * V / ||V||`` with
``V = W + s B A`` (DoRA, norms per output row). Autograd through that composition would form ``dW' = g^T x``, as
full fine-tuning does (as many FLOPs as the forward matmul). The adapter gradients only need ``dW'`` through thin
products: ``dA = s (g c B)^T x - ...`` and ``dB = s (c g)^T (x A^T) - ...`` (``c = m / ||V||``, DoRA's row scale;
the ``...`` terms are DoRA's per-row projection, from ``dm = sum_t g * (y - b) / m``, which needs the output, not
another matmul). So training an adapted linear costs about one forward and one input-gradient matmul, like a
frozen layer, instead of the three matmuls of a trained one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, magnitude):
        v = torch.addmm(weight, b, a, alpha=scaling)  # W + s B A
        if magnitude is None:
            c, w = None, v
        else:
            c = magnitude / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (out, 1)
            w = c * v
        y = F.linear(x, w, bias)
        ctx.scaling = scaling
        ctx.save_for_backward(x, w, a, b, c, magnitude, y if magnitude is not None else None, bias)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, c, magnitude, y, bias = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_a, need_b, _, need_m = ctx.needs_input_grad
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gx = (gy @ w) if need_x else None
        gbias = g2.sum(0) if need_bias else None
        ga = gb = gm = None
        if magnitude is None:  # LoRA: dW' = g^T x, dA = s B^T dW', dB = s dW' A^T
            if need_a:
                ga = ((g2 @ b).t() @ x2).mul_(s)
            if need_b:
                gb = (g2.t() @ (x2 @ a.t())).mul_(s)
            return gx, None, gbias, ga, gb, None, None
        # DoRA: x V^ = (y - b) / m per row, so dm = sum_t g (y - b) / m and dV = c dW' - c dm V^
        y2 = y.reshape(-1, y.shape[-1])
        if bias is not None:
            y2 = y2 - bias
        m = magnitude.reshape(-1)
        dm = (g2 * y2).sum(0) / m  # (out,)
        gm = dm.reshape(magnitude.shape) if need_m else None
        v_hat = w / magnitude  # V / ||V||
        cd = c.reshape(-1) * dm  # (out,)
        if need_a:  # s B^T dV
            ga = ((g2 @ (c * b)).t() @ x2 - (b * cd[:, None]).t() @ v_hat).mul_(s)
        if need_b:  # s dV A^T
            gb = (c * (g2.t() @ (x2 @ a.t())) - cd[:, None] * (v_hat @ a.t())).mul_(s)
        return gx, None, gbias, ga, gb, None, gm


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor, scaling: float, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W')`` for LoRA's ``W' = W + s B A`` or, with ``magnitude``, DoRA's; ``weight`` gets no
    gradient (the base is frozen), the adapter's factors, magnitude and the input do."""
    return _LowRankLinear.apply(x, weight, bias, a, b, float(scaling), magnitude)


def fusable(base: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`lowrank_linear` computes exactly the adapter's output here: a frozen fp32 ``nn.Linear`` outside
    autocast (AMP keeps the adapters' unfused fp32 path)."""
    return (isinstance(base, torch.nn.Linear) and not base.weight.requires_grad and x.dtype == base.weight.dtype
            == torch.float32 and not torch.is_autocast_enabled(x.device.type))
