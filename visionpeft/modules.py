"""Walking a model's modules through adapter wrappers: the layer below both injection (:mod:`visionpeft.inject`)
and the model families (:mod:`visionpeft.families`), so neither imports the other to find or fold modules."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .methods import AdaptedModule

STATE_ATTR = "visionpeft"  # model.visionpeft: the adapter bookkeeping of an injected model (see visionpeft.inject)


def base_named_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, module, wrapper)`` over the model as it was before injection: wrappers are transparent."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, AdaptedModule):
            yield full, child.base_layer, child
            yield from base_named_modules(child.base_layer, f"{full}.")
        else:
            yield full, child, None
            yield from base_named_modules(child, f"{full}.")


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    """``(name, wrapper)`` of every adapter wrapper in ``model``, outer wrappers first."""
    for name, m in model.named_modules():
        if isinstance(m, AdaptedModule):
            yield name, m


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def fold_adapters_(model: nn.Module) -> bool:
    """Replace each wrapper by its base layer with the active adapter folded in (inner wrappers first), in place;
    a wrapper whose active adapter is not mergeable keeps only that adapter. True when no wrapper is left."""
    for name, wrapper in reversed(list(adapted_modules(model))):
        active = wrapper.active_adapter
        if active is None or wrapper.adapters[active].mergeable:
            replace_module(model, name, wrapper.merged())
        else:
            for other in [k for k in wrapper.adapters if k != active]:
                del wrapper.adapters[other]
    return not any(True for _ in adapted_modules(model))
