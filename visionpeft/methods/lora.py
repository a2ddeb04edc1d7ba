"""LoRA (Hu et al., 2021) for ``nn.Linear`` and ``nn.Conv2d`` of any kernel, stride, dilation and ``groups``.

For a convolution, ``A`` is a conv with the base's kernel, stride, padding and dilation that maps each channel group
to ``r`` channels, and ``B`` is a grouped 1x1 conv back to the group's outputs. Their composition is itself a conv
with the base's geometry, so the update ``delta_W`` folds into the base weight exactly. For grouped and depthwise
convs the rank is per group and capped at what one group can hold (a depthwise 3x3 group holds rank 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .base import Adapter, AdapterConfig, WeightAdapter, full_precision
from .lowrank_linear import fusable, lowrank_linear


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA options; ``alpha / r`` scales the update, ``dropout`` acts on the adapter's input only."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "zero": B = 0 (Hu et al.); "pissa": the base's principal directions (Meng et al., 2024); "eva": B = 0 with A
    # along the principal directions of the layer's inputs on the task's images (methods/eva.py), set by
    # visionpeft.init_from_data before training (the trainer does it); until then, and on load, it is the zero init
    init: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = checks.integer(self, "r", self.r, 1)
        self.alpha = checks.number(self, "alpha", self.alpha, "> 0", lambda v: v > 0)
        self.dropout = checks.number(self, "dropout", self.dropout, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.init not in INITS:
            raise checks.fail(self, "init", f"one of {list(INITS)}", self.init)

    def build(self, base: nn.Module, r: int) -> Adapter:
        return LoraAdapter(base, r=r, alpha=self.alpha, dropout=self.dropout, init=self.init)


INITS = ("zero", "pissa", "eva")


def group_rank(base: nn.Module, r: int) -> int:
    """Rank per channel group: ``r`` capped at the group's output count and its input fan-in."""
    if isinstance(base, nn.Conv2d):
        groups = base.groups
        fan_in = base.in_channels // groups * math.prod(base.kernel_size)
        return max(1, min(r, base.out_channels // groups, fan_in))
    if isinstance(base, nn.Linear):
        return max(1, min(r, base.in_features, base.out_features))
    raise TypeError(f"LoRA supports nn.Conv2d and nn.Linear, not {type(base).__name__}.")


def low_rank_pair(base: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
    """The down (``A``) and up (``B``) projections whose composition has the geometry of ``base``."""
    if isinstance(base, nn.Conv2d):
        g = base.groups
        a = nn.Conv2d(base.in_channels, r * g, base.kernel_size, base.stride, base.padding, base.dilation,
                      groups=g, bias=False, padding_mode=base.padding_mode)
        b = nn.Conv2d(r * g, base.out_channels, 1, groups=g, bias=False)
    elif isinstance(base, nn.Linear):
        a, b = nn.Linear(base.in_features, r, bias=False), nn.Linear(r, base.out_features, bias=False)
    else:
        raise TypeError(f"LoRA supports nn.Conv2d and nn.Linear, not {type(base).__name__}.")
    a.to(base.weight.device, base.weight.dtype)
    b.to(base.weight.device, base.weight.dtype)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)  # the injected model starts equal to the base
    return a, b


def compose_weight(a: nn.Module | torch.Tensor, b: nn.Module | torch.Tensor, base: nn.Module) -> torch.Tensor:
    """The weight of ``b(a(x))`` as one layer with the shape of ``base.weight`` (``a``, ``b``: layers or weights)."""
    wa, wb = getattr(a, "weight", a), getattr(b, "weight", b)
    if isinstance(base, nn.Linear):
        return wb @ wa
    g = base.groups
    wa = wa.reshape(g, wa.shape[0] // g, -1)  # (g, r, in/g * kh * kw)
    wb = wb.reshape(g, wb.shape[0] // g, -1)  # (g, out/g, r)
    return torch.bmm(wb, wa).reshape(base.weight.shape)


@torch.no_grad()
def principal_init(adapter: nn.Module, base: nn.Module) -> None:
    """PiSSA: start ``s B A`` at the top-``r`` singular part of each group's weight and keep that start as frozen
    buffers, so the adapted layer computes ``W + s (B A - B0 A0)``: equal to the base at step 0 (the base weight
    itself is never modified, so other adapters and ``set_adapter(None)`` still see it), with both factors
    receiving gradients from the first step along the weight's principal directions. Where the rank holds a whole
    group (depthwise convs: rank 1), the start would be the entire weight and DoRA's direction blind to ``B``'s
    scale, so such layers keep the zero init.

    The start is not saved: it is a function of the base weights, which an adapter file's fingerprint pins, so
    loading recomputes it (the file stays the zero init's size) and checks it against a digest that is saved."""
    a, b, r = adapter.lora_A, adapter.lora_B, adapter.r
    g = getattr(base, "groups", 1)
    w = base.weight.detach().float().reshape(g, base.weight.shape[0] // g, -1)
    if r >= min(w.shape[1:]):
        return
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    u, sv, vh = u[:, :, :r], sv[:, :r], vh[:, :r]
    # each component's largest |u| entry positive (sklearn's svd_flip), so that a LAPACK build choosing other signs
    # recomputes the same start; training is exactly sign-symmetric, so this changes no result
    sign = u.gather(1, u.abs().argmax(1, keepdim=True)).sign()  # (g, 1, r)
    u, vh = u * sign, vh * sign.transpose(1, 2)
    root = (sv / adapter.scaling).sqrt()  # s B A = U_r S_r V_r^T
    # on float16's grid: an fp16 adapter file or edge patch then carries the start exactly, and a recomputation
    # whose last float32 bits differ (another CPU, another LAPACK) rounds to the same start
    b.weight.copy_((u * root[:, None, :]).reshape(b.weight.shape).half())
    a.weight.copy_((root[:, :, None] * vh).reshape(a.weight.shape).half())
    adapter.register_buffer("init_A", a.weight.detach().clone(), persistent=False)
    adapter.register_buffer("init_B", b.weight.detach().clone(), persistent=False)
    adapter.register_buffer("init_digest", start_digest(adapter))
    adapter.register_load_state_dict_post_hook(check_start)


def start_digest(adapter: nn.Module) -> torch.Tensor:
    """Per-component sums of the start's factors (2 r values per group): a recomputed start whose components
    differ in sign, order or subspace gives other sums."""
    g = getattr(adapter.lora_A, "groups", 1)
    a0, b0 = adapter.init_A, adapter.init_B
    return torch.cat([a0.reshape(g, a0.shape[0] // g, -1).sum(2), b0.reshape(g, b0.shape[0] // g, -1).sum(1)], 1)


def check_start(adapter: nn.Module, incompatible_keys: object) -> None:
    """After loading a PiSSA adapter's tensors: the start recomputed from this base must be the one it trained from
    (to the file's fp16 precision)."""
    got, want = start_digest(adapter), adapter.init_digest
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(got.abs().max())):
        raise RuntimeError("the PiSSA start recomputed from this base (its top-r singular part) is not the one the "
                           "adapter was trained from; load it with the torch build it was trained with, or retrain "
                           "it with init: zero.")


def update_factors(adapter: nn.Module, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (g, k, fan-in) and ``B`` (g, out/g, k) per channel group with ``s B A`` the adapter's update: the
    trained factors (k = r), or for a PiSSA adapter ``[B, -B0] [A; A0]`` (k = 2r, as exact as the file)."""
    a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
    a, b = a.reshape(groups, a.shape[0] // groups, -1), b.reshape(groups, b.shape[0] // groups, -1)
    if not hasattr(adapter, "init_A"):
        return a, b
    a0, b0 = adapter.init_A.reshape(a.shape), adapter.init_B.reshape(b.shape)
    return torch.cat([a, a0], 1), torch.cat([b, -b0], 2)


def start_weight(adapter: nn.Module, base: nn.Module) -> torch.Tensor:
    """The weight the adapter's ``s B A`` is added to: the base's, less a PiSSA adapter's frozen start ``s B0 A0``."""
    if not hasattr(adapter, "init_A"):
        return base.weight
    return base.weight - compose_weight(adapter.init_A, adapter.init_B, base) * adapter.scaling


class LoraAdapter(WeightAdapter):
    """``y = base(x) + (alpha / r) * B(A(dropout(x)))``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "zero") -> None:
        super().__init__()
        self.r = group_rank(base, r)
        self.scaling = alpha / r
        self.lora_A, self.lora_B = low_rank_pair(base, self.r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init = init
        if init == "pissa":
            principal_init(self, base)

    def adapted_weight(self, base: nn.Module) -> torch.Tensor:
        return start_weight(self, base) + compose_weight(self.lora_A, self.lora_B, base) * self.scaling

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = start_weight(self, base)
        if isinstance(self.dropout, nn.Identity) and fusable(base, x):  # one matmul, no full weight gradient
            return lowrank_linear(x, w, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)
        with full_precision(x):
            delta = self.lora_B(self.lora_A(self.dropout(x.float()))) * self.scaling
        return (base(x) if w is base.weight else functional_layer(base, x, w)) + delta

    @torch.no_grad()
    def scale_update_(self, base: nn.Module, factor: float) -> None:
        scale_low_rank_(self, factor)

    def roundable_keys(self) -> tuple[str, ...]:
        return low_rank_keys(self)

    def before_rounding(self, sd: dict[str, torch.Tensor],
                        round_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        return refit_a_to_rounded_b(sd, round_fn) if self.roundable_keys() else sd


def low_rank_keys(adapter: nn.Module) -> tuple[str, ...]:
    """``A`` and ``B`` of an adapter whose update starts at zero. A PiSSA start puts the weights' principal part
    in them, where rounding would change the layer by far more than the update: kept exact."""
    return () if hasattr(adapter, "init_A") else ("lora_A.weight", "lora_B.weight")


@torch.no_grad()
def refit_a_to_rounded_b(sd: dict[str, torch.Tensor], round_fn: Callable[[torch.Tensor], torch.Tensor],
                         a_key: str = "lora_A.weight", b_key: str = "lora_B.weight") -> dict[str, torch.Tensor]:
    """``A`` refit to ``B``'s rounded value: per group, ``A' = argmin ||round(B) A' - B A||`` (least squares); the
    file then rounds ``B`` and ``A'``. ``B``'s error acts on the input directions training gave ``A``, ``A``'s is
    spread over every input direction of the layer: on one 4-bit file of the recipe, rounding ``A`` alone (``B``
    exact) cost nothing and ``B`` alone all that rounding both lost; over nine, the refit cut the mean loss from
    0.24 to 0.07 mAP50-95 points (README, "A 4-bit adapter file"). A group keeps its ``A`` where ``round(B)`` loses
    rank (a factor that never trained: ``A`` would collapse to zero) or the refit grows past twice ``A``'s largest
    value (its blocks' scales would coarsen the other values)."""
    if a_key not in sd or b_key not in sd:
        return sd
    a, b = sd[a_key], sd[b_key]
    r = b.shape[1]
    g = a.shape[0] // r  # compose_weight's grouping: A (g * r, ...), B (out, r)
    b_round = round_fn(b.float())
    a64 = a.double().reshape(g, r, -1)
    b64, bq64 = (t.double().reshape(g, b.shape[0] // g, r) for t in (b, b_round))
    refit = torch.linalg.lstsq(bq64, b64 @ a64).solution
    keep = (torch.linalg.matrix_rank(bq64) == r) & (refit.abs().amax((1, 2)) <= 2 * a64.abs().amax((1, 2)))
    a_new = torch.where(keep[:, None, None], refit, a64)
    return {**sd, a_key: a_new.reshape(a.shape).to(a.dtype)}  # B as it was: the file rounds it as round_fn did


def scale_low_rank_(adapter: nn.Module, factor: float) -> None:
    """``s B A`` times ``factor``: exact for a zero start; a PiSSA start would need rank 2r, so it is refused."""
    if hasattr(adapter, "init_A"):
        raise TypeError("A PiSSA-initialised adapter cannot scale its update (its start is not the base); "
                        "use init: zero.")
    adapter.lora_B.weight.mul_(factor)


def functional_layer(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run ``base``'s operation with another weight (its own bias and geometry)."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)
