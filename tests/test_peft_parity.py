"""Cross-check with Hugging Face peft: the same LoRA weights give the same outputs and the same merged weights."""

from __future__ import annotations

import copy

import peft  # a test dependency: pip install -e ".[test]"
import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.inject import adapted_modules


class Net(nn.Module):
    """A standard conv (3x3, stride 2) and a Linear, the layer types both libraries adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(("r", "alpha"), [(4, 8), (2, 7)])
def test_lora_matches_peft(r, alpha):
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(3, 6, 16, 16)
    ours = vp.inject(copy.deepcopy(net), vp.LoraConfig(r=r, alpha=alpha, target_modules=["conv", "fc"],
                                                       target_types=["Conv2d", "Linear"]))
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                                      target_modules=["conv", "fc"]))
    wrappers = dict(adapted_modules(ours))
    assert set(wrappers) == {"conv", "fc"}
    with torch.no_grad():
        for name, wrapper in wrappers.items():
            adapter = wrapper.adapters["default"]
            adapter.lora_B.weight.normal_(0, 0.2)  # both libraries start B at zero: make the update visible
            layer = theirs.base_model.model.get_submodule(name)
            assert layer.scaling["default"] == adapter.scaling == alpha / r
            assert layer.lora_A["default"].weight.shape == adapter.lora_A.weight.shape
            assert layer.lora_B["default"].weight.shape == adapter.lora_B.weight.shape
            layer.lora_A["default"].weight.copy_(adapter.lora_A.weight)
            layer.lora_B["default"].weight.copy_(adapter.lora_B.weight)

    with torch.no_grad():
        y_ours, y_theirs, y_base = ours(x), theirs(x), net(x)
    assert (y_ours - y_base).abs().max() > 1e-2
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)

    merged_ours, merged_theirs = vp.merge(ours), theirs.merge_and_unload()
    for name in ("conv", "fc"):
        for p in ("weight", "bias"):
            torch.testing.assert_close(getattr(merged_ours.get_submodule(name), p),
                                       getattr(merged_theirs.get_submodule(name), p), rtol=1e-5, atol=1e-6)
