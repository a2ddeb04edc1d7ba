"""The contract every adapter method follows, and the wrapper that hosts adapters on one module.

An *adapter* is pure math: given the frozen base module and an input, it computes the adapted output, and, when
the method allows it, folds itself into the base weights (``merge_into``). An :class:`AdaptedModule` replaces one
target module in a model, keeps the base module frozen under ``base_layer`` and holds any number of named adapters,
one of which is active. Nothing here knows about Ultralytics or timm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from . import checks


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
        self.target_modules = checks.names(self, "target_modules", self.target_modules, regex=True)
        self.target_types = checks.names(self, "target_types", self.target_types, regex=False)
        self.exclude_modules = checks.names(self, "exclude_modules", self.exclude_modules or [], regex=True,
                                            allow_none=False)
        self.layers = self._checked_layers(self.layers)
        self.rank_pattern = self._checked_rank_pattern(self.rank_pattern or {})

    def _checked_layers(self, layers: Any) -> list[int] | None:
        if layers is None:
            return None
        if isinstance(layers, str):
            try:
                layers = parse_layers(layers)
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}.{e}") from None
        elif isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise checks.fail(self, "layers", "a non-empty list of layer indices >= 0 or a string such as '5-23'",
                              layers)
        return [checks.integer(self, "layers", i, 0) for i in layers]

    def _checked_rank_pattern(self, pattern: Any) -> dict[str, int]:
        if not isinstance(pattern, dict):
            raise checks.fail(self, "rank_pattern", "a mapping {regex: rank}, e.g. {'cv2': 4}", pattern)
        if pattern and "r" not in {f.name for f in fields(self)}:
            raise ValueError(f"{type(self).__name__}.rank_pattern sets ranks, but method '{self.method}' has no "
                             "rank; use it with lora, dora or bottleneck.")
        for key in pattern:
            if not isinstance(key, str) or not key:
                raise checks.fail(self, "rank_pattern", "a mapping with regex or suffix keys", pattern)
            checks.pattern(self, "rank_pattern", key)
        return {k: checks.integer(self, f"rank_pattern[{k!r}]", r, 1) for k, r in pattern.items()}

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
            lo, hi = int(lo), int(hi or lo)
            if hi < lo:
                raise ValueError
            out.extend(range(lo, hi + 1))
    except ValueError:
        raise ValueError(f"layers must be indices and ascending ranges such as '5-23' or '0,1,9-12', got {spec!r}") \
            from None
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

    def scale_update_(self, base: nn.Module, factor: float) -> None:
        """Move the adapted module toward ``base`` in place: 1 keeps it, 0 gives the base. Done on the method's own
        tensors, so adapter files, switching and merging carry it."""
        raise TypeError(f"{type(self).__name__} cannot scale its update.")

    def roundable_keys(self) -> tuple[str, ...]:
        """State-dict keys an adapter file may store rounded to 8 or 4 bits (:mod:`visionpeft.blockquant`): tensors
        whose rounding error stays small in the update, such as low-rank factors that start at zero. None here."""
        return ()

    def before_rounding(self, sd: dict[str, torch.Tensor],
                        round_fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's tensors (``state_dict()`` keys) as a file of rounded factors should take them before it
        rounds each of ``roundable_keys()`` on its own; ``round_fn`` is that rounding (a tensor -> the one the file
        gives back), so a method can adjust one factor to another's rounded value. Unchanged here."""
        return sd

    def upgrade_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This adapter's tensors from a file of an earlier build, keyed as ``state_dict()`` keys them now."""
        return sd


class WeightAdapter(Adapter):
    """An adapter that computes its layer's whole adapted weight (``adapted_weight``): merging copies it in."""

    mergeable: ClassVar[bool] = True

    def adapted_weight(self, base: nn.Module) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> nn.Module:
        base.weight.copy_(self.adapted_weight(base))
        return base


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
