"""Find target modules, wrap them with adapters, freeze the rest, switch adapters, merge, report.

The model keeps its own class and attribute layout (an Ultralytics ``DetectionModel`` stays one), so the libraries'
trainers, validators and exporters keep working on it. What visionpeft knows about the injected adapters lives in
``model.visionpeft`` (a plain dict, so it survives ``deepcopy`` and pickling in Ultralytics checkpoints).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .families import Family, family_of
from .frozen_norm import freeze_norms, unfreeze_norms
from .keep_modes import check_keep_base_mode, keep_base_mode, keep_base_record
from .methods import AdaptedModule, AdapterConfig, config_from_dict
from .methods.trainable import TrainableCopy
from .modules import STATE_ATTR, adapted_modules, base_named_modules, replace_module


def peft_state(model: nn.Module) -> dict:
    """The adapter bookkeeping of an injected model: ``{"family", "fingerprint", "active", "adapters": {...}}``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("This model carries no visionpeft adapters. Call visionpeft.inject(model, config) first.")
    return state


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model had before injection: adapter tensors dropped, ``base_layer.`` unwrapped."""
    return {
        k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k
    }


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Architecture (tensor names, shapes, dtypes) and weight hash of the base model."""
    sd = base_state_dict(model)
    arch, weights = hashlib.sha256(type(model).__name__.encode()), hashlib.sha256()
    for k, v in sd.items():
        arch.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        weights.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith(f".{p}") or re.fullmatch(p, name) for p in patterns)


def is_target(name: str, module: nn.Module, config: AdapterConfig) -> bool:
    if config.target_types and type(module).__name__ not in config.target_types:
        return False
    if config.target_modules and not _matches(name, config.target_modules):
        return False
    if config.layers is not None and not any(name.startswith(f"model.{i}.") or name == f"model.{i}"
                                             for i in config.layers):
        return False
    return not _matches(name, config.exclude_modules)


def rank_for(name: str, config: AdapterConfig) -> int:
    for pattern, r in config.rank_pattern.items():
        if _matches(name, [pattern]):
            return int(r)
    return int(getattr(config, "r", 0))


def _probe_shapes(model: nn.Module, family: Family, names: set[str]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Input and output shapes of the named modules, from one forward of the family's example input."""
    shapes, hooks = {}, []

    def record(name: str):
        def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:  # returning a value would replace `out`
            shapes.setdefault(name, (inp[0].shape, out.shape))
        return hook

    for name, m, _ in base_named_modules(model):
        if name in names:
            hooks.append(m.register_forward_hook(record(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(family.example_input(model))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def inject(
    model: nn.Module,
    configs: AdapterConfig | Sequence[AdapterConfig | dict],
    adapter_name: str = "default",
    names: dict[int, str] | Sequence[str] | None = None,
    keep_base: bool | str = False,
) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place, activate it and freeze everything else.

    ``configs`` are method configs (or their dicts); a module gets the first config that targets it. ``names`` are
    the class names of the task (detectors): when they differ from the model's, the family re-initialises the
    class outputs as trainable modules of this adapter. ``keep_base`` (detectors): ``merge`` then keeps the base
    classes beside ``names`` (base names first), running the base's layers from the lowest adapted one on beside
    their adapted copies; a new name equal to a base name is an error. ``keep_base="head"``: the adapted layers
    below the head are shared (one trunk, run once, feeding the base's head too) and only the head is doubled, so
    the base classes are the base head's on the adapted features (train with ``distill_base`` to keep them);
    ``keep_base="classes"``: the adapted box branch is shared too, only the class branch is doubled.
    """
    check_keep_base_mode(keep_base)
    configs = [configs] if isinstance(configs, AdapterConfig) else list(configs)
    family = family_of(model)
    configs = [family.with_defaults(config_from_dict(c) if isinstance(c, dict) else c) for c in configs]
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = {"family": family.name, "fingerprint": fingerprint(model), "active": None, "adapters": {}}
    if adapter_name in state["adapters"]:
        raise ValueError(f"The model already has an adapter named '{adapter_name}'. Pick another name.")
    names = family.normalize_names(names) if names is not None else None

    # name -> (base module, its wrapper if any, the method config or a re-initialised module to train in full)
    plan: dict[str, tuple[nn.Module, AdaptedModule | None, AdapterConfig | nn.Module]] = {}
    for name, module, wrapper, new_module in family.class_output_replacements(model, names):
        plan[name] = (module, wrapper, new_module)  # a re-initialised replacement, trained in full
    for config in configs:
        for name, module, wrapper in base_named_modules(model):
            if name not in plan and is_target(name, module, config):
                plan[name] = (module, wrapper, config)
    if not plan:
        raise ValueError(f"No module of the model matches the adapter targets {[c.to_dict() for c in configs]}.")
    start = (family.keep_base_start(model, names, list(plan), keep_base)
             if keep_base else None)  # checked before any change

    shaped = {n for n, (_, _, c) in plan.items() if getattr(c, "needs_shapes", False)}
    shapes = _probe_shapes(model, family, shaped) if shaped else {}
    targets = {}
    for name, (module, wrapper, config) in plan.items():
        if isinstance(config, nn.Module):
            adapter, method = TrainableCopy(config), "trainable"
        else:
            r = rank_for(name, config)
            adapter = config.build(module, r, shapes[name]) if name in shaped else config.build(module, r)
            method = config.method
        p = next(module.parameters(), None)
        if p is not None:
            adapter.to(p.device)
        if wrapper is None:
            wrapper = AdaptedModule(module)
            replace_module(model, name, wrapper)
        wrapper.add_adapter(adapter_name, adapter)
        targets[name] = method

    state["adapters"][adapter_name] = {
        "configs": [c.to_dict() for c in configs],
        "targets": targets,
        "names": names,
    }
    if start is not None:  # recorded in adapter files: the mode and where the branch leaves the base
        base_classes = len(state.get("base_names") or getattr(model, "names", None) or {})
        state["adapters"][adapter_name]["keep_base"] = {"layer": start, "base_classes": base_classes,
                                                        **keep_base_record(keep_base)}
    setattr(model, STATE_ATTR, state)
    family.on_inject(model)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str | None) -> nn.Module:
    """Activate ``adapter_name`` everywhere (``None``: the plain base model) and make only it trainable."""
    state = peft_state(model)
    if adapter_name is not None and adapter_name not in state["adapters"]:
        raise KeyError(f"No adapter named '{adapter_name}'. Loaded adapters: {sorted(state['adapters'])}.")
    for _, wrapper in adapted_modules(model):
        wrapper.set_adapter(adapter_name)
    state["active"] = adapter_name
    family_of(model).on_activate(model, state["adapters"].get(adapter_name))
    freeze(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name``; wrappers left without adapters become their plain base module again."""
    state = peft_state(model)
    if adapter_name not in state["adapters"]:
        raise KeyError(f"No adapter named '{adapter_name}'. Loaded adapters: {sorted(state['adapters'])}.")
    for name, wrapper in reversed(list(adapted_modules(model))):
        if adapter_name in wrapper.adapters:
            del wrapper.adapters[adapter_name]
        if not len(wrapper.adapters):
            replace_module(model, name, wrapper.base_layer)
    del state["adapters"][adapter_name]
    if not state["adapters"]:
        set_adapter(model, None)
        unfreeze_norms(model)  # the plain base again, BatchNorms included
        family_of(model).on_unload(model)
        delattr(model, STATE_ATTR)
    else:
        set_adapter(model, state["active"] if state["active"] in state["adapters"] else None)
    return model


def trainable_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the active adapter trains."""
    active = peft_state(model)["active"]
    marker = f".adapters.{active}."
    return {n for n, _ in model.named_parameters() if marker in n}


def full_trained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the active adapter that train in full, not low-rank: re-initialised class outputs and
    BatchNorm copies (:class:`~visionpeft.methods.trainable.TrainableCopy`)."""
    active = peft_state(model)["active"]
    copies = [w.adapters[active] for _, w in adapted_modules(model) if active in w.adapters]
    return [p for c in copies if isinstance(c, TrainableCopy) for p in c.parameters()]


def freeze(model: nn.Module) -> set[str]:
    """Set ``requires_grad`` to train exactly the active adapter; returns the trainable names.

    Frozen BatchNorms become :class:`~visionpeft.frozen_norm.FrozenBatchNorm2d`: their statistics cannot drift
    and they keep no activation for the backward pass. Trainers that re-enable gradients on frozen parameters
    (Ultralytics does) call this again before building their optimizer.
    """
    names = trainable_parameter_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    freeze_norms(model)
    return names


def frozen_norm_modules(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers with no trainable parameter: their running statistics must not move (eval mode)."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]


def merge_(model: nn.Module) -> nn.Module:
    """Fold the active mergeable adapters into the base weights, in place; other adapters are dropped."""
    return family_of(model).merge_(model)


def merge(model: nn.Module) -> nn.Module:
    """A new model with the active adapter folded in: a plain model of the base's class (the input is unchanged).

    Non-mergeable adapters (bottleneck) stay as modules that compute the same function and export to ONNX. An
    adapter that keeps the base classes gives the base and the merged branch as one model (:func:`with_base`).
    """
    merged = merge_(copy.deepcopy(model))
    return merged if keep_base_layer(model) is None else with_base(model, merged)


def check_scale_factor(factor: object) -> None:
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 <= factor <= 1):
        raise ValueError(f"The scale of an adapter's update must be a number in [0, 1], not {factor!r}.")


def check_scale_pattern(pattern: object) -> None:
    """A ``{module-name pattern: factor}`` mapping as :func:`scale_adapter` takes it, or a one-line error."""
    if not isinstance(pattern, dict):
        raise ValueError(f"A scale pattern maps module names or regexes to factors, e.g. {{'model\\.[0-4]\\..*': 0}}, "
                         f"not {pattern!r}.")
    for key, factor in pattern.items():
        try:
            re.compile(key)
        except (re.error, TypeError):
            raise ValueError(f"Scale pattern key {key!r} is not a module name or regex.") from None
        check_scale_factor(factor)


def scale_adapter(model: nn.Module, factor: float, adapter_name: str | None = None,
                  pattern: dict[str, float] | None = None) -> nn.Module:
    """Move adapter ``adapter_name`` (default: the active one) toward the base in place: its update times
    ``factor`` (1 keeps it, 0 gives the base), as the weight of a LoRA in diffusers or WiSE-FT's interpolation.
    ``pattern`` gives modules their own factor, matched as ``rank_pattern`` is (a name, a suffix or a regex; the
    first that matches wins), e.g. ``{r"model\\.[0-4]\\..*": 0}``: the adapter's update off in layers 0-4.

    Re-initialised class outputs have no base and are kept. An adapter that keeps the base classes on a shared
    trunk (``keep_base: head`` or ``classes``) is scaled where the base classes read it and kept where only its new
    classes do: the dial between new-class and base-class accuracy after training (README, "Keep the base
    classes"). A branch (``keep_base: true``) keeps the base exactly already and is refused.
    """
    check_scale_factor(factor)
    pattern = pattern or {}
    check_scale_pattern(pattern)
    state = peft_state(model)
    name = adapter_name or state["active"]
    if name not in state["adapters"]:
        raise ValueError(f"No adapter named {name!r} to scale. Adapters: {sorted(state['adapters'])}.")
    record = state["adapters"][name].get("keep_base")
    mode = keep_base_mode(record)
    if mode is True:
        raise ValueError(f"Adapter {name!r} keeps the base classes in a branch of their own, exactly; scaling it "
                         "would only weaken its new classes. Scale an adapter of keep_base 'head' or 'classes'.")
    family = family_of(model)
    for module_name, wrapper in adapted_modules(model):
        if name not in wrapper.adapters or (mode and family.new_classes_only(model, module_name, mode)):
            continue
        adapter = wrapper.adapters[name]
        if isinstance(adapter, TrainableCopy) and not adapter.has_base_shape(wrapper.base_layer):
            continue  # a re-initialised class output
        own = next((f for p, f in pattern.items() if _matches(module_name, [p])), factor)
        adapter.scale_update_(wrapper.base_layer, float(own))
    return model


def keep_base_layer(model: nn.Module) -> int | None:
    """Where the active adapter's branch leaves the base, if it keeps the base classes (``keep_base``); else None."""
    state = getattr(model, STATE_ATTR, None)
    info = (state or {}).get("adapters", {}).get((state or {}).get("active"), {})
    return info["keep_base"]["layer"] if info.get("keep_base") else None


def with_base(model: nn.Module, branch: nn.Module) -> nn.Module:
    """The untouched base of ``model`` and ``branch`` (``model`` with its active keep-base adapter, merged or not)
    as one model: base classes, then the adapter's. Neither input is changed."""
    start = keep_base_layer(model)
    if start is None:
        raise ValueError("The active adapter does not keep the base classes (inject it with keep_base=True).")
    state = peft_state(model)
    mode = keep_base_mode(state["adapters"][state["active"]]["keep_base"])
    base = copy.deepcopy(model)
    set_adapter(base, None)
    return family_of(model).keep_base_model(merge_(base), branch, start, mode)


@dataclass
class TrainableReport:
    """Trainable parameters per top-level block and in total."""

    rows: list[tuple[str, int, int]]  # (block, trainable, total)
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        w = max([len(b) for b, _, _ in self.rows] + [5])
        lines = [f"{'block':<{w}} {'trainable':>10} {'total':>10} {'%':>7}"]
        lines += [f"{b:<{w}} {t:>10,} {n:>10,} {100 * t / max(n, 1):>6.2f}%" for b, t, n in self.rows if t]
        lines.append(f"{'all':<{w}} {self.trainable:>10,} {self.total:>10,} {self.percent:>6.2f}%")
        return "\n".join(lines)


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count the parameters the active model computes with, by block; trainable = ``requires_grad``.

    Inactive adapters and base modules that the active adapter replaces outright are left out of the total.
    """
    skip = []
    for name, wrapper in adapted_modules(model):
        skip += [f"{name}.adapters.{k}." for k in wrapper.adapters if k != wrapper.active_adapter]
        if wrapper.active_adapter and isinstance(wrapper.adapters[wrapper.active_adapter], TrainableCopy):
            skip.append(f"{name}.base_layer.")
    rows: dict[str, list[int]] = {}
    for n, p in model.named_parameters():
        if any(n.startswith(s) for s in skip):
            continue
        row = rows.setdefault(_block_of(n), [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    out = [(b, t, n) for b, (t, n) in rows.items()]
    return TrainableReport(out, sum(r[1] for r in out), sum(r[2] for r in out))
