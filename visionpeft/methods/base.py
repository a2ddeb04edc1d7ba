"""The contract every adapter method follows, and the wrapper that hosts adapters on one module.

An *adapter* is pure math: given the frozen base module and an input, it computes the adapted output, and, when
the method allows it, folds itself into the base weights (``merge_into``). An :class:`AdaptedModule` replaces one
target module in a model, keeps the base module frozen under ``base_layer`` and holds any number of named adapters,
one of which is active. Nothing here knows about Ultralytics or timm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class AdapterConfig:
    """Targets and options shared by every method.

    Target selection (all given criteria must hold; an empty criterion matches everything):
        target_modules: regexes, full-matched against the dotted module name, or a plain suffix (``"qkv"``).
        layers: Ultralytics layer indices; the module must live under ``model.<i>.``. A string of indices and
            ranges is accepted too: ``"5-23"``, ``"0,1,9-12"``.
        target_types: class names of the modules to adapt (``"Conv2d"``, ``"Linear"``, ``"C3k2"``).
        exclude_modules: regexes or suffixes of modules never to adapt.
        rank_pattern: per-target rank overrides, ``{regex: r}``, first match wins.
    ``None`` for a criterion means "use the model family's default".
    """

    method: ClassVar[str] = ""
    target_modules: list[str] | None = None
    layers: list[int] | None = None
    target_types: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = {k: v for k, v in d.items() if k != "method"}
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for method '{cls.method}'. Valid options: {sorted(valid)}."
            )
        return cls(**d)


def parse_layers(spec: str) -> list[int]:
    """``"5-23"`` or ``"0,1,9-12"`` -> the layer indices it names, in order."""
    out: list[int] = []
    try:
        for part in spec.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"layers={spec!r}: give indices and ranges such as '5-23' or '0,1,9-12'.") from None
    return out


def full_precision(x: torch.Tensor) -> torch.autocast:
    """Run adapter math in float32 even under AMP: low-rank products of fp16 activations overflow (the adapter's
    gradient then turns inf/NaN and the scaler skips every step), and adapters are too small for fp16 to pay."""
    return torch.autocast(x.device.type, enabled=False)


class Adapter(nn.Module):
    """One adapter on one base module. Subclasses implement ``forward(base, x)`` and, if mergeable, ``merge_into``."""

    mergeable: ClassVar[bool] = False

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge_into(self, base: nn.Module) -> nn.Module:
        """Return a plain module computing exactly what ``forward(base, .)`` computes (may modify ``base``)."""
        raise TypeError(f"{type(self).__name__} cannot be merged into its base module.")


class AdaptedModule(nn.Module):
    """A frozen ``base_layer`` plus named adapters; the active one (or none) decides the forward."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter
        self.active_adapter = name

    def set_adapter(self, name: str | None) -> None:
        """Activate adapter ``name``; a name this module does not carry (or ``None``) means the plain base."""
        self.active_adapter = name if name in self.adapters else None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.active_adapter is None:
            return self.base_layer(x, *args, **kwargs)
        return self.adapters[self.active_adapter](self.base_layer, x)

    def merged(self) -> nn.Module:
        """A plain module equal to this one with the active adapter folded in (the base is modified in place)."""
        if self.active_adapter is None:
            return self.base_layer
        return self.adapters[self.active_adapter].merge_into(self.base_layer)

    def __getattr__(self, name: str) -> Any:
        # Code around the target reads attributes such as ``conv.in_channels`` or ``mlp.fc1``: serve the base's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
