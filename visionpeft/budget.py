"""Plan LoRA/DoRA ranks per layer from a budget: a share of the model's parameters or an adapter file size.

``gradient`` planning reads the full weight gradient of every adapted layer over a few training batches (the base
weights get gradients for this probe only). The loss can fall by about ``sigma_k`` per unit step along the k-th
singular direction of that gradient, and a rank-k update reaches the first k directions, so rank unit ``k`` of a
layer is worth ``sigma_k`` (summed over channel groups) and costs the adapter parameters one rank adds. Units go,
best value per byte of the adapter file first, until the budget is spent; a layer that gets no unit is not adapted.
``uniform`` gives every target the same rank, the largest that fits. The budget is the file's: with ``bits`` (the
factors in 4- or 8-bit blocks, ``peft.file_bits``) a rank unit costs 0.28x or 0.53x its float16 bytes, so the
same budget buys more rank. Nothing here knows about Ultralytics: the caller supplies the losses.
"""

from __future__ import annotations

import copy
import heapq
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import blockquant
from .families import family_of
from .inject import inject, is_target, trainable_report
from .io import adapter_to_bytes
from .methods import config_from_dict
from .methods.lora import group_rank
from .modules import adapted_modules

RANK_PLANS = ("gradient", "uniform")
PLANNED_METHODS = ("lora", "dora")
_UNITS = {"b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2}  # KB as in the benchmark's table
METADATA_MARGIN = 512  # bytes the trainer's own metadata (epoch, fitness) may add to the file
FP16_BYTES = 2


def value_bytes(bits: int) -> float:
    """File bytes per low-rank factor value: float16 (``bits`` 16), or integers in blocks with a float16 scale each."""
    if bits == 16:
        return FP16_BYTES
    return (blockquant.BLOCK * blockquant.check_bits(bits) / 8 + FP16_BYTES) / blockquant.BLOCK


@dataclass(frozen=True)
class Budget:
    """``fraction`` of the task model's fp16 weights, or ``bytes`` of the adapter file."""

    text: str
    fraction: float | None = None
    bytes: int | None = None


def parse_budget(value: object) -> Budget:
    """``"5%"`` (of the merged task model's parameters, as fp16 bytes: the adapter file is at most 5 % of the task
    model's fp16 weights) or ``"250KB"``/``"0.5MB"`` (the adapter file; KB = 1024 bytes)."""
    text = str(value).strip().replace(" ", "")
    hint = ("must be a share of the model's parameters such as '5%', or an adapter file size such as '250KB' or "
            f"'0.5MB', not {value!r}")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%|[kKmM]i?[bB]|[bB])", text) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"peft.budget {hint}.")
    amount, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < amount < 100:
            raise ValueError(f"peft.budget {hint} (a share between 0 and 100 %).")
        return Budget(text, fraction=amount / 100)
    size = int(amount * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"peft.budget {hint} (a positive size).")
    return Budget(text, bytes=size)


@dataclass
class _Layer:
    """One planned target: what a rank costs, what each rank unit is worth, how many units it can hold."""

    config: int  # index of the config that targets it
    base_rank: int  # the config's rank
    unit_cost: int  # parameters per rank (lora_A + lora_B)
    first_cost: int  # extra parameters of a layer adapted at all (DoRA's magnitude)
    cap: int  # the highest rank the plan may give it
    unit_bytes: float  # file bytes per rank (the factors, float16 or rounded)
    first_bytes: float  # file bytes of the magnitude (always float16)
    gains: list[float] = field(default_factory=list)


@dataclass
class RankPlan:
    """Ranks per target module (0: not adapted) and the method configs that inject them."""

    budget: str
    mode: str
    ranks: dict[str, int]
    trainable: int  # parameters the planned adapter trains
    file_limit: int  # the budget, in bytes of the adapter file
    bits: int  # how the file stores the low-rank factors: 16 (float16), 8 or 4 (blocks)
    configs: list[dict]

    def record(self) -> dict:
        """What adapter files keep of the plan (the ranks themselves are in the configs' ``rank_pattern``)."""
        return {"budget": self.budget, "rank_plan": self.mode, "trainable": self.trainable,
                "file_limit_bytes": self.file_limit, "file_bits": self.bits}

    def summary(self) -> str:
        """One line per top-level block: ``model.2: cv1 8, cv2 4, m.0.cv1 -``."""
        blocks: dict[str, list[str]] = {}
        for name, r in self.ranks.items():
            parts = name.split(".")
            head = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
            rest = name[len(head) + 1:].removesuffix(".conv") or name
            blocks.setdefault(head, []).append(f"{rest} {r or '-'}")
        kb = self.file_limit / 1024
        stored = "float16" if self.bits == 16 else f"{self.bits}-bit blocks"
        lines = [f"rank plan '{self.mode}' for budget {self.budget} (adapter file <= {kb:,.0f} KB, factors in "
                 f"{stored}): {self.trainable:,} trainable parameters, "
                 f"{sum(r > 0 for r in self.ranks.values())}/{len(self.ranks)} layers adapted (-: none)"]
        return "\n".join([*lines, *(f"  {b}: {', '.join(v)}" for b, v in blocks.items())])


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _group_svdvals(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Singular values of a weight gradient per channel group, summed over groups: the value of each rank unit."""
    g = grad.reshape(groups, grad.shape[0] // groups, -1).float()
    return torch.linalg.svdvals(g).sum(0)


def _weight_gradients(probe: nn.Module, names: list[str], losses: Callable[[nn.Module], Iterable[torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Accumulated gradient of each named target's base weight, the adapters switched off (the base's forward)."""
    wrappers = dict(adapted_modules(probe))
    for p in probe.parameters():
        p.requires_grad_(False)
    for name in names:
        wrappers[name].active_adapter = None
        wrappers[name].base_layer.weight.requires_grad_(True)
    probe.train()
    count = 0
    for loss in losses(probe):
        loss.backward()
        count += 1
    if not count:
        raise ValueError("Rank planning got no batch to measure gradients on: the dataset's train split is empty.")
    return {n: wrappers[n].base_layer.weight.grad for n in names}


def check_plannable(methods: list[dict]) -> None:
    """The one-line error for method configs (dicts, as in YAML) whose ranks a budget cannot plan."""
    kinds = [m.get("method") if isinstance(m, dict) else None for m in methods]
    if not any(k in PLANNED_METHODS for k in kinds):
        raise ValueError(f"peft.budget plans the ranks of {'/'.join(PLANNED_METHODS)} adapters, and the methods are "
                         f"{kinds}; add a lora or dora method to peft.methods, or remove the budget.")
    if any(isinstance(m, dict) and m.get("init", "zero") != "zero" for m in methods):
        raise ValueError("peft.budget plans ranks for adapters that start at zero (its plans were measured with them), "
                         "not for PiSSA starts (init: pissa): remove init: pissa or the budget.")


def plan_ranks(
    model: nn.Module,
    configs: list[dict],
    budget: str,
    losses: Callable[[nn.Module], Iterable[torch.Tensor]] | None = None,
    mode: str = "gradient",
    names: dict[int, str] | list[str] | None = None,
    max_rank_mult: int = 2,
    bits: int = 16,
) -> RankPlan:
    """Ranks for the LoRA/DoRA targets of ``configs`` on ``model`` (not changed) that fit ``budget``.

    ``losses(probe)`` yields scalar training losses of a copy of the model (``gradient`` mode); ``names`` are the
    task's classes, as for :func:`~visionpeft.inject.inject`. A layer may get up to ``max_rank_mult`` times its
    config's rank. ``bits`` is how the file will store the low-rank factors (16: float16; 8 or 4:
    ``save_adapter(..., bits=)``). The returned configs are ``configs`` with ``rank_pattern`` and
    ``exclude_modules`` entries (exact module names) that inject the plan.
    """
    spent = parse_budget(budget)
    if mode not in RANK_PLANS:
        raise ValueError(f"peft.rank_plan must be one of {list(RANK_PLANS)}, not {mode!r}.")
    per_value = value_bytes(bits)
    parsed = [config_from_dict(c) for c in configs]
    check_plannable(configs)
    probe = inject(copy.deepcopy(model), configs, adapter_name="rank_plan", names=names)
    family = family_of(model)
    defaulted = [family.with_defaults(c) for c in parsed]
    layers: dict[str, _Layer] = {}
    fixed = planned_now = 0
    for name, wrapper in adapted_modules(probe):
        adapter = wrapper.adapters["rank_plan"]
        size = _numel(adapter)
        if not hasattr(adapter, "lora_A"):  # class outputs trained in full, BatchNorm copies, other methods
            fixed += size
            continue
        index = next(i for i, c in enumerate(defaulted) if is_target(name, wrapper.base_layer, c))
        unit = (_numel(adapter.lora_A) + _numel(adapter.lora_B)) // adapter.r
        rank, first = defaulted[index].r, size - unit * adapter.r
        layers[name] = _Layer(index, rank, unit, first, group_rank(wrapper.base_layer, max_rank_mult * rank),
                              unit * per_value, first * FP16_BYTES)
        planned_now += size
    task_params = trainable_report(probe).total - planned_now  # the merged task model's parameters
    # A share is of the task model's fp16 weights (what its checkpoint holds), so the file meets it on both counts
    size = spent.bytes if spent.bytes is not None else int(spent.fraction * FP16_BYTES * task_params)
    fixed_bytes = fixed * FP16_BYTES
    payload = fixed_bytes + sum(lay.first_bytes + lay.unit_bytes * lay.base_rank for lay in layers.values())
    header = _file_bytes(probe, bits) - payload  # names, metadata, block padding
    room = size - header - METADATA_MARGIN - fixed_bytes
    cheapest = min((lay.first_bytes + lay.unit_bytes for lay in layers.values()), default=0)
    if cheapest > room:
        raise ValueError(f"peft.budget {budget} leaves {max(room + fixed_bytes, 0):,.0f} bytes after the file's "
                         f"header, less than the {fixed_bytes:,} of the parameters trained in full (class outputs, "
                         f"BatchNorm copies) plus one rank ({cheapest:,.0f}); raise the budget.")

    if mode == "gradient":
        if losses is None:
            raise ValueError("Gradient rank planning needs training losses; pass losses= or use rank_plan: uniform.")
        grads = _weight_gradients(probe, list(layers), losses)
        for name, lay in layers.items():
            base = probe.get_submodule(name).base_layer
            lay.gains = _group_svdvals(grads[name], getattr(base, "groups", 1))[: lay.cap].tolist()
        top = max((g for lay in layers.values() for g in lay.gains), default=0.0)
        for lay in layers.values():  # units worth nothing (a gradient of lower rank, or none) are not bought
            lay.gains = [g for g in lay.gains if g > 1e-6 * top]
    for _ in range(4):  # the plan's own metadata (rank_pattern) lengthens the header: shrink until the file fits
        ranks = _greedy(layers, room) if mode == "gradient" else _uniform(layers, room, budget, fixed_bytes)
        trainable = fixed + sum(lay.first_cost + lay.unit_cost * ranks[n] for n, lay in layers.items() if ranks[n])
        plan = RankPlan(spent.text, mode, ranks, trainable, size, bits,
                        _planned_configs(configs, defaulted, layers, ranks))
        over = _file_size(model, plan, names) - size
        if over <= 0:
            return plan
        room -= over + 1
    raise ValueError(f"peft.budget {budget}: no plan found whose adapter file fits {size:,} bytes; raise the budget.")


def _greedy(layers: dict[str, _Layer], room: float) -> dict[str, int]:
    """Rank units by value per file byte, each layer's in order, while they fit in ``room`` bytes."""
    ranks = dict.fromkeys(layers, 0)
    heap = [(-lay.gains[0] / (lay.first_bytes + lay.unit_bytes), name) for name, lay in layers.items() if lay.gains]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        lay, k = layers[name], ranks[name]
        cost = lay.unit_bytes + (lay.first_bytes if k == 0 else 0)
        if cost > room:
            continue  # the layer's later units are worth less per byte: it stays at rank k
        room -= cost
        ranks[name] = k + 1
        if k + 1 < len(lay.gains):
            heapq.heappush(heap, (-lay.gains[k + 1] / lay.unit_bytes, name))
    return ranks


def _uniform(layers: dict[str, _Layer], room: float, budget: str, fixed_bytes: int) -> dict[str, int]:
    """The same rank everywhere (capped per layer), the largest that fits."""
    def cost(r: int) -> float:
        return sum(lay.first_bytes + lay.unit_bytes * min(r, lay.cap) for lay in layers.values())

    top = max(lay.cap for lay in layers.values())
    fitting = [r for r in range(1, top + 1) if cost(r) <= room]
    if not fitting:
        raise ValueError(f"peft.budget {budget}: rank 1 on every target takes {fixed_bytes + cost(1):,.0f} bytes of "
                         "the file, over the budget; raise it, or use rank_plan: gradient (it leaves layers out).")
    return {name: min(fitting[-1], lay.cap) for name, lay in layers.items()}


def _planned_configs(configs: list[dict], defaulted: list, layers: dict[str, _Layer], ranks: dict[str, int]
                     ) -> list[dict]:
    """``configs`` with the plan written in: exact-name ``rank_pattern`` entries first (first match wins), and
    ``exclude_modules`` for layers left out (in every config that targets them, so no later config takes them)."""
    out = [copy.deepcopy(c) for c in configs]
    for name, lay in layers.items():
        r = ranks[name]
        if r == 0:
            for i, c in enumerate(out):
                if i >= lay.config and defaulted[i].method in PLANNED_METHODS:
                    c["exclude_modules"] = [*(c.get("exclude_modules") or []), name]
        elif r != lay.base_rank:
            c = out[lay.config]
            c["rank_pattern"] = {**c.get("rank_pattern", {}), name: r}
    for c in out:  # planned entries before the user's own
        user = {k: v for k, v in (c.get("rank_pattern") or {}).items() if k not in ranks}
        planned = {k: v for k, v in (c.get("rank_pattern") or {}).items() if k in ranks}
        if planned or user:
            c["rank_pattern"] = {**planned, **user}
    return out


def _file_bytes(model: nn.Module, bits: int, extra: dict | None = None) -> int:
    """Bytes of the adapter file ``model``'s active adapter would be saved to: float16, factors rounded if asked."""
    return len(adapter_to_bytes(model, extra=extra, dtype=torch.float16, bits=None if bits == 16 else bits))


def _file_size(model: nn.Module, plan: RankPlan, names) -> int:
    """Bytes of the planned adapter's file (written in memory), with room for the trainer's metadata."""
    probe = inject(copy.deepcopy(model), plan.configs, adapter_name="rank_plan", names=names)
    return _file_bytes(probe, plan.bits, {"budget": plan.record()}) + METADATA_MARGIN
