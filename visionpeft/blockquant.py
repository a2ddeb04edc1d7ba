"""Block-wise integer rounding of tensors for small adapter files (llama.cpp's Q8_0 / Q4_0 layout).

A tensor is flattened and cut into blocks of ``BLOCK`` values; each block keeps one float16 scale (its largest
magnitude over the largest integer, rounded up) and its values as signed integers of ``bits`` bits, symmetric
around zero: 8 bits cost 8.5 bits per value, 4 bits 4.5. Four-bit values are stored two to a byte (low nibble
first), offset by 8. Each scale keeps only as many significant bits as float16 has beyond the integer's (8 for 4-bit
values, 4 for 8-bit), so every restored value is a float16 number: code that stores the factors as float16 where
that is lossless (edge patches) still can. Torch only; the file layout around it is :mod:`visionpeft.io`'s.
"""

from __future__ import annotations

import math

import torch

BLOCK = 32
BITS = (8, 4)


def check_bits(bits: object) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)} (integers per value in a block of {BLOCK}), not {bits!r}.")
    return int(bits)


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # 127 or 7: symmetric, so zero stays exactly zero


def _scales(top: torch.Tensor, bits: int) -> torch.Tensor:
    """``top / qmax`` rounded up to ``12 - bits`` significant bits, as float16: an integer of ``bits - 1`` bits
    times it fits float16's 11 (in its normal range), and no value of the block rounds beyond ``qmax``."""
    mant, exp = torch.frexp(top.double() / _qmax(bits))  # mant in [0.5, 1)
    keep = 2.0 ** (12 - bits)
    return torch.ldexp(torch.ceil(mant * keep) / keep, exp).to(torch.float16)


def quantize(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, scales)``: int8 ``(blocks, 32)`` for 8 bits, uint8 ``(blocks, 16)`` for 4; float16 ``(blocks,)``."""
    check_bits(bits)
    flat = t.detach().to("cpu", torch.float32).reshape(-1)
    blocks = math.ceil(flat.numel() / BLOCK)
    x = torch.nn.functional.pad(flat, (0, blocks * BLOCK - flat.numel())).reshape(blocks, BLOCK)
    qmax = _qmax(bits)
    scales = _scales(x.abs().amax(1), bits)  # rounded first: the integers are taken against it
    if not torch.isfinite(scales).all():
        raise ValueError(f"values up to {float(x.abs().max()):.3g} do not fit float16 scales")
    s = scales.float()
    q = torch.where(s[:, None] > 0, x / torch.where(s > 0, s, 1.0)[:, None], 0.0).round().clamp(-qmax, qmax)
    q = q.to(torch.int8)
    if bits == 4:
        u = (q + 8).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return q.contiguous(), scales.contiguous()


def dequantize(data: torch.Tensor, scales: torch.Tensor, bits: int, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``quantize`` stored; ``ValueError`` if the parts do not fit together."""
    check_bits(bits)
    numel = math.prod(shape)
    blocks = math.ceil(numel / BLOCK)
    width, dtype = (BLOCK, torch.int8) if bits == 8 else (BLOCK // 2, torch.uint8)
    if data.dtype != dtype or tuple(data.shape) != (blocks, width):
        raise ValueError(f"expected {dtype} data of shape ({blocks}, {width}), got {data.dtype} {tuple(data.shape)}")
    if scales.dtype != torch.float16 or tuple(scales.shape) != (blocks,):
        raise ValueError(f"expected float16 scales of shape ({blocks},), got {scales.dtype} {tuple(scales.shape)}")
    if not torch.isfinite(scales).all():
        raise ValueError("its scales are not all finite")
    q = torch.stack([data & 15, data >> 4], 2).reshape(blocks, BLOCK).to(torch.int8) - 8 if bits == 4 else data
    return (q.float() * scales.float()[:, None]).reshape(-1)[:numel].reshape(shape)


def round_trip(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` as a file of ``bits``-bit blocks gives it back (float32)."""
    return dequantize(*quantize(t, bits), bits, t.shape)
