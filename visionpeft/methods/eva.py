"""EVA-style data-driven start for LoRA/DoRA (Paischer et al., 2024, "Explained Variance Adaptation"; peft's
``init_lora_weights="eva"``): ``A``'s rows along the top-``r`` principal directions of the layer's own inputs on
the task's images, ``B = 0``. The adapted layer still starts equal to the base, so nothing but the trained factors
is saved and a load needs no data; only the directions the first updates of ``B`` can take differ from a random
draw: the ones that carry most of the input signal.

For a conv the inputs are its receptive-field patches (``in/groups * kh * kw`` values each, per channel group), as
``A`` sees them. Two choices differ from peft's EVA: the second moment is not centred (the mean patch is itself a
direction an update can use, a per-channel offset, which BitFit-style shifts showed to matter), and the rows keep
the norm of the default draw instead of unit norm, so the learning rate tuned for that draw carries over.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ROW_NORM = 1 / math.sqrt(3)  # kaiming_uniform_(a=sqrt(5)) rows: fan_in values of variance 1 / (3 fan_in)


def patch_moments(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sum_p p p^T`` over the input patches ``p`` that ``base`` reads in ``x``, per channel group: (g, d, d)."""
    x = x.detach().float()
    if isinstance(base, nn.Linear):
        p = x.reshape(-1, x.shape[-1])
        return (p.T @ p)[None].double()
    if not isinstance(base, nn.Conv2d):
        raise TypeError(f"input moments are defined for nn.Linear and nn.Conv2d, not {type(base).__name__}")
    mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
    x = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)  # as Conv2d pads: int, "same", any mode
    cols = F.unfold(x, base.kernel_size, base.dilation, 0, base.stride)  # (n, in * kh * kw, positions)
    g = base.groups
    cols = cols.reshape(cols.shape[0], g, cols.shape[1] // g, cols.shape[2])
    return torch.einsum("ngdl,ngel->gde", cols, cols).double()


@torch.no_grad()
def input_principal_init_(adapter: nn.Module, base: nn.Module, moments: torch.Tensor) -> None:
    """Set ``adapter.lora_A`` to the top-``r`` eigenvectors of ``moments`` (from :func:`patch_moments`), per group,
    each row scaled to the default draw's norm; ``B`` stays zero, so the layer still equals ``base``."""
    a = adapter.lora_A.weight
    g = moments.shape[0]
    r = a.shape[0] // g
    _, vecs = torch.linalg.eigh(moments)  # ascending eigenvalues
    top = vecs.flip(-1)[:, :, :r].transpose(1, 2)  # (g, r, d), largest first
    # each row's largest |entry| positive, so that another LAPACK build gives the same start
    sign = top.gather(2, top.abs().argmax(2, keepdim=True)).sign()
    a.copy_((top * sign * DEFAULT_ROW_NORM).reshape(a.shape).to(a.dtype))
