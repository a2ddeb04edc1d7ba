"""The family interface, with the generic behaviour used for any other ``nn.Module``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..frozen_norm import unfreeze_norms
from ..methods import AdapterConfig
from ..modules import STATE_ATTR, fold_adapters_


class Family:
    """Generic model: targets must be given explicitly, no class outputs, no example input."""

    name = "generic"
    #: per method, the default target criteria: {"lora": {"target_types": [...], ...}}
    defaults: dict[str, dict] = {}

    def matches(self, model: nn.Module) -> bool:
        return False

    def with_defaults(self, config: AdapterConfig) -> AdapterConfig:
        """Fill the criteria the config leaves at ``None`` with this family's defaults for its method."""
        d = self.defaults.get(config.method, {})
        changes = {k: v for k, v in d.items() if k != "exclude_modules" and getattr(config, k) is None}
        excl = [e for e in d.get("exclude_modules", []) if e not in config.exclude_modules]
        return dataclasses.replace(config, **changes, exclude_modules=[*config.exclude_modules, *excl])

    def normalize_names(self, names: dict[int, str] | Sequence[str]) -> dict[int, str]:
        return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else dict(enumerate(names))

    def class_output_replacements(self, model: nn.Module, names: dict[int, str] | None) -> list:
        """``(name, module, wrapper, new_module)`` for each class output to re-initialise for ``names``."""
        if names is not None:
            raise ValueError(f"Class names were given, but the {self.name} family has no class outputs to adapt.")
        return []

    def example_input(self, model: nn.Module) -> torch.Tensor:
        raise ValueError(
            "This adapter method needs the shapes of its target modules, and visionpeft does not know what input "
            f"a {type(model).__name__} takes. Use a supported model family (YOLO, timm ViT)."
        )

    def keep_base_start(self, model: nn.Module, names: dict[int, str] | None, targets: list[str],
                        mode: bool | str = True) -> int:
        """Check that ``model`` can keep its classes beside ``names`` in ``keep_base`` ``mode``
        (:mod:`visionpeft.keep_modes`); where the branch starts."""
        raise ValueError(f"keep_base works on YOLO detectors; a {self.name} model has no class outputs to keep. "
                         "Train without keep_base.")

    def keep_base_model(self, base: nn.Module, branch: nn.Module, start: int, mode: bool | str = True) -> nn.Module:
        """One model computing the plain ``base`` and ``branch`` (changed from layer ``start`` on) side by side, as
        ``keep_base`` ``mode`` shares them (:mod:`visionpeft.keep_modes`)."""
        raise ValueError(f"keep_base works on YOLO detectors, not on a {self.name} model.")

    def new_classes_only(self, model: nn.Module, name: str, mode: bool | str) -> bool:
        """Whether module ``name`` of an adapter that keeps the base classes in ``mode`` feeds the new classes only
        (the doubled part), not the base classes too."""
        return False

    def on_inject(self, model: nn.Module) -> None:
        """Called after a new adapter was added."""

    def on_activate(self, model: nn.Module, adapter: dict | None) -> None:
        """Called when an adapter (``None``: the plain base) becomes active."""

    def on_unload(self, model: nn.Module) -> None:
        """Called when the last adapter module was merged away."""

    def merge_(self, model: nn.Module) -> nn.Module:
        """Fold the active mergeable adapters into the base weights, in place; other adapters are dropped.

        Here rather than in :mod:`visionpeft.inject` (whose ``merge_`` calls it) because model classes merge before
        Ultralytics' Conv+BN fusion, and the integration layer must not call back into the injection layer.
        """
        plain = fold_adapters_(model)
        for p in model.parameters():
            p.requires_grad_(False)
        unfreeze_norms(model)  # a merged model is a plain one: its BatchNorms behave as the base's again
        if plain:
            self.on_unload(model)
            if hasattr(model, STATE_ATTR):
                delattr(model, STATE_ATTR)
        return model
