"""Adapter methods: one module each (config + adapter math), tied to a name by ``METHODS``."""

from __future__ import annotations

from typing import Any

from .base import AdaptedModule, Adapter, AdapterConfig
from .bottleneck import BottleneckConfig
from .dora import DoraConfig
from .loha import LohaConfig
from .lora import LoraConfig
from .norm_stats import NormStatsConfig
from .shift import ShiftConfig
from .trainable import TrainableConfig

METHODS: dict[str, type[AdapterConfig]] = {
    c.method: c
    for c in (LoraConfig, DoraConfig, LohaConfig, BottleneckConfig, NormStatsConfig, ShiftConfig, TrainableConfig)
}


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build a method config from a dict with a ``method`` key (as in YAML files and adapter metadata)."""
    name = d.get("method")
    if name not in METHODS:
        raise ValueError(f"Unknown adapter method '{name}'. Available methods: {sorted(METHODS)}.")
    return METHODS[name].from_dict(d)


__all__ = ["METHODS", "AdaptedModule", "Adapter", "AdapterConfig", "BottleneckConfig", "DoraConfig", "LohaConfig",
           "LoraConfig", "NormStatsConfig", "ShiftConfig", "TrainableConfig", "config_from_dict"]
