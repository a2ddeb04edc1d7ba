"""Data-driven adapter starts (``init: eva``, :mod:`visionpeft.methods.eva`): each such adapter's ``A`` from the
inputs its layer sees on a few of the task's images, before training. Nothing here knows about Ultralytics: the
caller passes image batches as the model takes them (the trainer passes unaugmented train images)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .methods.eva import input_principal_init_, patch_moments
from .modules import adapted_modules


@torch.no_grad()
def init_from_data(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Start every active ``init: eva`` adapter of ``model`` from the inputs of its layer on ``batches`` (the
    model runs in eval mode; its adapters still equal the base there, ``B`` being zero). Returns how many layers
    were set; 0 when no active adapter asks for it (the batches are then not read). Adapters that
    trained already (``B != 0``) are refused."""
    wrappers = {name: w for name, w in adapted_modules(model)
                if w.active_adapter is not None and getattr(w.adapters[w.active_adapter], "init", None) == "eva"}
    if not wrappers:
        return 0
    trained = [name for name, w in wrappers.items() if w.adapters[w.active_adapter].lora_B.weight.any()]
    if trained:  # a second call would replace trained directions and break the layer's equality with its start
        raise ValueError(f"init_from_data starts untrained adapters, but the active adapter of {trained[0]} is "
                         "trained already (B != 0); call it right after inject, before training.")
    moments: dict[str, torch.Tensor] = {}

    def collect(name: str):
        def hook(wrapper: nn.Module, args: tuple) -> None:
            m = patch_moments(wrapper.base_layer, args[0])
            moments[name] = moments[name] + m if name in moments else m
        return hook

    handles = [w.register_forward_pre_hook(collect(name)) for name, w in wrappers.items()]
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for images in batches:
            model(images.to(device))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    missing = sorted(set(wrappers) - set(moments))
    if missing:
        raise RuntimeError(f"init: eva: the images never reached the adapted layers {missing[:3]}; pass batches "
                           "the model runs end to end.")
    for name, w in wrappers.items():
        input_principal_init_(w.adapters[w.active_adapter], w.base_layer, moments[name])
    return len(wrappers)
