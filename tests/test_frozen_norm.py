"""FrozenBatchNorm2d: the frozen layers' BatchNorm as a constant affine map (same outputs, no saved activations)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from visionpeft.frozen_norm import FrozenBatchNorm2d, freeze_norms, unfreeze_norms


def pretrained_like_bn(c: int = 16, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=0.03, affine=affine)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn.requires_grad_(False).eval()


def saved_numel(fn, x: torch.Tensor) -> int:
    """Elements autograd keeps for the backward pass of ``fn(x)``."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn(x)
    return sum(sizes)


@pytest.mark.parametrize("affine", [True, False])
def test_equals_eval_batchnorm_in_any_mode_with_the_same_gradient(affine):
    bn = pretrained_like_bn(affine=affine)
    frozen = copy.deepcopy(bn)
    assert freeze_norms(frozen) == 1 and type(frozen) is FrozenBatchNorm2d
    x = torch.randn(4, 16, 9, 7, requires_grad=True)
    ref = bn(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    frozen.train()  # a trainer's model.train() changes nothing
    out = frozen(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen.running_mean, bn.running_mean) and torch.equal(frozen.running_var, bn.running_var)


def test_keeps_no_activation_for_backward():
    bn = pretrained_like_bn()
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    assert saved_numel(bn, x) >= x.numel()  # the control: F.batch_norm keeps its input
    freeze_norms(bn)
    assert saved_numel(bn, x) <= 16  # only the per-channel scale


def test_same_state_dict_and_ultralytics_fusion():
    bn = pretrained_like_bn()
    frozen = copy.deepcopy(bn)
    freeze_norms(frozen)
    assert frozen.state_dict().keys() == bn.state_dict().keys()
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(2, 8, 10, 10)
    fused = fuse_conv_and_bn(copy.deepcopy(conv), frozen)
    torch.testing.assert_close(fused(x), frozen(conv(x)), rtol=1e-4, atol=1e-4)


def test_keeps_the_input_dtype():
    frozen = pretrained_like_bn()
    freeze_norms(frozen)
    assert frozen(torch.randn(2, 16, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_only_frozen_norms_are_swapped_and_unfrozen_ones_go_back():
    model = nn.Sequential(pretrained_like_bn(), pretrained_like_bn().requires_grad_(True),
                          nn.BatchNorm2d(16, track_running_stats=False).requires_grad_(False))
    assert freeze_norms(model) == 1
    assert [type(m) for m in model] == [FrozenBatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d]
    model[0].requires_grad_(True)  # trained again: must use batch statistics and gradients like any BatchNorm
    freeze_norms(model)
    assert type(model[0]) is nn.BatchNorm2d
    freeze_norms(model.requires_grad_(False))
    unfreeze_norms(model)
    assert all(type(m) is nn.BatchNorm2d for m in model)
