"""Adapter math on single layers: LoRA and DoRA for every conv geometry and Linear, bottleneck adapters, AMP.

Each adapted output is checked against a reference computed here from the adapter's tensors (not through the
adapter's own helpers), and every mergeable adapter must fold into its base layer exactly.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, run
from timm.layers import Mlp
from torch import nn

import visionpeft as vp
from visionpeft.methods import AdaptedModule, config_from_dict
from visionpeft.methods.bottleneck import ConvBottleneck, TokenBottleneck
from visionpeft.modules import adapted_modules

torch.manual_seed(0)

# (in, out, kernel, stride, padding, dilation, groups, padding_mode)
CONV_GEOMETRIES = {
    "1x1": (8, 16, 1, 1, 0, 1, 1, "zeros"),
    "3x3": (8, 16, 3, 1, 1, 1, 1, "zeros"),
    "3x3-stride2": (8, 12, 3, 2, 1, 1, 1, "zeros"),
    "5x5-dilated": (8, 8, 5, 1, 4, 2, 1, "zeros"),
    "3x1-asymmetric": (8, 16, (3, 1), (2, 1), (1, 0), 1, 1, "zeros"),
    "same-padding-dilated-groups4": (8, 16, 3, 1, "same", 2, 4, "zeros"),
    "reflect-padding": (8, 16, 3, 1, 1, 1, 1, "reflect"),
    "grouped": (8, 16, 3, 1, 1, 1, 2, "zeros"),
    "depthwise": (8, 8, 3, 1, 1, 1, 8, "zeros"),
    "depthwise-stride2": (8, 8, 3, 2, 1, 1, 8, "zeros"),
    "depthwise-multiplier2": (8, 16, 3, 1, 1, 1, 8, "zeros"),
    "depthwise-7x7-nobias": (8, 8, 7, 1, 3, 1, 8, "zeros"),
}


def make_conv(geometry: str) -> nn.Conv2d:
    cin, cout, k, s, p, d, g, mode = CONV_GEOMETRIES[geometry]
    return nn.Conv2d(cin, cout, k, s, p, d, groups=g, bias="nobias" not in geometry, padding_mode=mode)


def make_layer(kind: str) -> nn.Module:
    return nn.Linear(24, 40) if kind == "linear" else make_conv(kind)


def layer_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 7, layer.in_features)  # tokens: (batch, sequence, features)
    return torch.randn(2, layer.in_channels, 11, 13)


def wrap(layer: nn.Module, config) -> AdaptedModule:
    wrapper = AdaptedModule(layer)
    wrapper.add_adapter("a", config.build(layer, getattr(config, "r", 0)))
    return wrapper


def randomize(adapter: nn.Module) -> None:
    with torch.no_grad():
        adapter.lora_B.weight.normal_(0, 0.1)


def low_rank_delta(adapter, base: nn.Module) -> torch.Tensor:
    """Reference ``scaling * B @ A`` built group by group from the adapter's two weights."""
    a, b = adapter.lora_A.weight, adapter.lora_B.weight
    if isinstance(base, nn.Linear):
        return adapter.scaling * (b @ a)
    g, r = base.groups, adapter.r
    out_g = base.out_channels // g
    blocks = [b[j * out_g:(j + 1) * out_g, :, 0, 0] @ a[j * r:(j + 1) * r].flatten(1) for j in range(g)]
    return adapter.scaling * torch.cat(blocks).reshape(base.weight.shape)


def apply_weight(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    if base.padding_mode != "zeros":
        pad = [q for p in reversed(base.padding) for q in (p, p)]
        return F.conv2d(F.pad(x, pad, mode=base.padding_mode), weight, base.bias, base.stride, 0, base.dilation,
                        base.groups)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max()) if not a.requires_grad else rel_err(a.detach(), b.detach())


LAYERS = ["linear", *CONV_GEOMETRIES]


# -- LoRA ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LAYERS)
def test_lora_starts_equal_to_base(kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    wrapper = wrap(copy.deepcopy(layer), vp.LoraConfig(r=4, alpha=8))
    assert torch.equal(wrapper(x), layer(x))
    assert wrapper.adapters["a"].lora_B.weight.abs().sum() == 0
    assert wrapper.adapters["a"].lora_A.weight.abs().sum() > 0  # A is random, or no gradient would reach B


@pytest.mark.parametrize("kind", LAYERS)
def test_lora_output_and_exact_merge(kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    wrapper = wrap(copy.deepcopy(layer), vp.LoraConfig(r=4, alpha=8))
    adapter = wrapper.adapters["a"]
    randomize(adapter)
    expected = apply_weight(layer, x, layer.weight + low_rank_delta(adapter, layer))
    y = wrapper(x)
    assert rel_err(y, layer(x)) > 1e-2, "the random adapter should change the output"
    assert rel_err(y, expected) < 1e-5

    merged = wrapper.merged()
    assert type(merged) is type(layer)
    assert rel_err(merged(x), y) < 1e-5


@pytest.mark.parametrize("kind", ["3x3", "grouped", "depthwise-multiplier2", "linear"])
def test_lora_update_has_rank_r_per_group(kind):
    layer = make_layer(kind)
    adapter = wrap(layer, vp.LoraConfig(r=2)).adapters["a"]
    randomize(adapter)
    delta = low_rank_delta(adapter, layer)
    groups = getattr(layer, "groups", 1)
    for block in delta.reshape(groups, delta.shape[0] // groups, -1):
        assert torch.linalg.matrix_rank(block) == 2


def test_lora_rank_is_capped_per_group():
    """A depthwise 3x3 group maps 9 inputs to 1 output: rank 1 is all it can hold."""
    assert wrap(make_conv("depthwise"), vp.LoraConfig(r=8)).adapters["a"].r == 1
    assert wrap(make_conv("depthwise-multiplier2"), vp.LoraConfig(r=8)).adapters["a"].r == 2
    assert wrap(make_conv("grouped"), vp.LoraConfig(r=8)).adapters["a"].r == 8
    assert wrap(nn.Linear(4, 40), vp.LoraConfig(r=8)).adapters["a"].r == 4


def test_lora_scaling_is_alpha_over_r():
    layer, x = nn.Linear(24, 40), torch.randn(3, 24)
    deltas = []
    for alpha in (4.0, 16.0):
        wrapper = wrap(copy.deepcopy(layer), vp.LoraConfig(r=4, alpha=alpha))
        torch.manual_seed(0)
        with torch.no_grad():
            wrapper.adapters["a"].lora_A.weight.normal_()
            wrapper.adapters["a"].lora_B.weight.normal_()
        assert wrapper.adapters["a"].scaling == alpha / 4
        deltas.append(wrapper(x) - layer(x))
    torch.testing.assert_close(deltas[1], 4 * deltas[0], rtol=1e-4, atol=1e-5)


def test_lora_dropout_acts_on_the_adapter_input_only():
    layer, x = nn.Linear(24, 40), torch.randn(16, 24)
    wrapper = wrap(copy.deepcopy(layer), vp.LoraConfig(r=4, dropout=0.5)).train()
    assert torch.equal(wrapper(x), layer(x)), "with B = 0, dropout must not touch the base path"
    randomize(wrapper.adapters["a"])
    assert not torch.allclose(wrapper(x), wrapper(x)), "training mode: dropout is random"
    reference = wrap(copy.deepcopy(layer), vp.LoraConfig(r=4, dropout=0.0))
    reference.adapters["a"].load_state_dict(wrapper.adapters["a"].state_dict())
    wrapper.eval()
    assert torch.equal(wrapper(x), wrapper(x))
    torch.testing.assert_close(wrapper(x), reference(x))


def test_lora_rejects_other_layers():
    with pytest.raises(TypeError, match="Conv2d and nn.Linear"):
        vp.LoraConfig().build(nn.Conv1d(4, 4, 3), 4)


# -- DoRA ------------------------------------------------------------------------------------------------------
def dora_reference_weight(adapter, base: nn.Module) -> torch.Tensor:
    w = base.weight + low_rank_delta(adapter, base)
    norm = w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    return adapter.magnitude * w / norm


@pytest.mark.parametrize("kind", LAYERS)
def test_dora_output_and_exact_merge(kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    wrapper = wrap(copy.deepcopy(layer), vp.DoraConfig(r=4, alpha=8))
    torch.testing.assert_close(wrapper(x), layer(x), rtol=1e-5, atol=1e-6)  # starts at the base

    adapter = wrapper.adapters["a"]
    randomize(adapter)
    with torch.no_grad():
        adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
    y = wrapper(x)
    assert rel_err(y, layer(x)) > 1e-2
    assert rel_err(y, apply_weight(layer, x, dora_reference_weight(adapter, layer))) < 1e-5

    merged = wrapper.merged()
    assert type(merged) is type(layer)
    assert rel_err(merged(x), y) < 1e-5


@pytest.mark.parametrize("init", ["zero", "pissa"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "linear-nobias", "3x3", "depthwise"])
def test_frozen_linear_adapters_backpropagate_through_the_factors(method, kind, init):
    """On a frozen Linear, LoRA and DoRA run one matmul with the composed weight and compute their gradients from
    the low-rank factors (no full weight gradient): equal to autograd through the composed weight, in float64.
    Convs keep the plain autograd path (a low-rank conv backward measured slower on this CPU), with the same
    result. A PiSSA adapter's frozen start is subtracted from the weight the update is added to."""
    layer = (nn.Linear(24, 40, bias=False) if kind == "linear-nobias" else make_layer(kind)).requires_grad_(False)
    config = (vp.LoraConfig if method == "lora" else vp.DoraConfig)(r=4, alpha=8, init=init)
    wrapper = wrap(layer, config)
    adapter = wrapper.adapters["a"]
    start = low_rank_delta(adapter, layer).detach().double()
    randomize(adapter)
    if method == "dora":
        with torch.no_grad():
            adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
    x = layer_input(layer).requires_grad_(True)
    y = wrapper(x)
    fused = kind.startswith("linear")
    assert (type(y.grad_fn).__name__ == "_LowRankLinearBackward") == fused  # the path tested is the one expected
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert layer.weight.grad is None

    ref = {n: p.detach().double().requires_grad_(True) for n, p in adapter.named_parameters()}
    xr = x.detach().double().requires_grad_(True)
    twin = SimpleNamespace(lora_A=SimpleNamespace(weight=ref["lora_A.weight"]), r=adapter.r, scaling=adapter.scaling,
                           lora_B=SimpleNamespace(weight=ref["lora_B.weight"]))  # the factors in float64
    w = layer.weight.double() + low_rank_delta(twin, layer) - start
    if method == "dora":
        w = ref["magnitude"] * w / w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    yr = apply_weight(copy.deepcopy(layer).double(), xr, w)
    (yr * g.double()).sum().backward()
    assert rel_err(y.double(), yr) < 1e-5
    assert rel_err(x.grad.double(), xr.grad) < 1e-5
    for name, p in adapter.named_parameters():
        assert rel_err(p.grad.double(), ref[name].grad) < 1e-5, name


def test_dora_magnitude_scales_each_output_channel():
    layer, x = nn.Linear(24, 40), torch.randn(3, 24)
    wrapper = wrap(copy.deepcopy(layer), vp.DoraConfig(r=4))
    with torch.no_grad():
        wrapper.adapters["a"].magnitude.mul_(3.0)
    torch.testing.assert_close(wrapper(x) - layer.bias, 3 * (layer(x) - layer.bias), rtol=1e-4, atol=1e-5)


# -- PiSSA initialisation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [vp.LoraConfig(r=2, alpha=4, init="pissa"), vp.DoraConfig(r=2, alpha=8,
                                                                                              init="pissa")])
@pytest.mark.parametrize("kind", LAYERS)
def test_pissa_starts_at_the_principal_part_equal_to_the_base(config, kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    wrapper = wrap(copy.deepcopy(layer), config)
    adapter = wrapper.adapters["a"]
    torch.testing.assert_close(wrapper(x), layer(x), rtol=1e-4, atol=1e-5)  # the model starts at the base
    assert torch.equal(wrapper.base_layer.weight, layer.weight)  # ... without touching the base weight
    g = getattr(layer, "groups", 1)
    if adapter.r >= min(layer.weight.shape[0] // g, layer.weight[0].numel()):  # the rank holds a whole group
        assert not adapter.lora_B.weight.any() and not list(adapter.buffers())  # the zero init: nothing to start
        return
    # s B A is the best rank-r approximation of each group's weight: from a full SVD here
    w = layer.weight.detach().reshape(g, layer.weight.shape[0] // g, -1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :, :adapter.r] * sv[:, None, :adapter.r]) @ vh[:, :adapter.r]
    assert rel_err(low_rank_delta(adapter, layer), best.reshape(layer.weight.shape)) < 1e-3  # factors on fp16's grid
    assert sorted(n for n, _ in adapter.named_buffers()) == ["init_A", "init_B", "init_digest"]  # not trained
    assert "init_A" not in adapter.state_dict()  # ... and not saved: a reload recomputes the start from the base


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "3x3", "grouped", "5x5-dilated"])
def test_pissa_computes_the_update_from_its_start_and_merges_exactly(method, kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    config = (vp.LoraConfig if method == "lora" else vp.DoraConfig)(r=2, alpha=4, init="pissa")
    wrapper = wrap(copy.deepcopy(layer), config)
    adapter = wrapper.adapters["a"]
    start = low_rank_delta(adapter, layer).detach()
    randomize(adapter)
    w = layer.weight + low_rank_delta(adapter, layer) - start  # W + s (B A - B0 A0), reference built here
    if method == "dora":
        w = adapter.magnitude * w / w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    y = wrapper(x)
    assert rel_err(y, layer(x)) > 1e-2
    assert rel_err(y, apply_weight(layer, x, w)) < 1e-5
    assert rel_err(wrapper.merged()(x), y) < 1e-5


# -- EVA initialisation (A from the layer's inputs) ---------------------------------------------------------------
def reference_patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(groups, patches, in/groups * kh * kw): every input patch ``layer`` reads, cut out by slicing."""
    if isinstance(layer, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho, wo = layer(x).shape[2:]
    cut = [xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
           for i in range(kh) for j in range(kw)]
    p = torch.stack(cut, 2)  # (n, c, kh * kw, ho, wo)
    g = layer.groups
    p = p.reshape(p.shape[0], g, -1, ho * wo)  # channel-major per group, as a conv weight is laid out
    return p.permute(1, 0, 3, 2).reshape(g, -1, p.shape[2])


@pytest.mark.parametrize("config", [vp.LoraConfig(r=2, alpha=4, init="eva"), vp.DoraConfig(r=2, alpha=8, init="eva")])
@pytest.mark.parametrize("kind", LAYERS)
def test_eva_starts_along_the_inputs_principal_directions_equal_to_the_base(config, kind):
    layer = make_layer(kind)
    x = layer_input(layer) + torch.linspace(-1, 2, layer_input(layer).shape[-1])  # inputs with a mean and a slope
    wrapper = wrap(copy.deepcopy(layer), config)
    adapter = wrapper.adapters["a"]
    drawn = adapter.lora_A.weight.detach().clone()
    assert vp.init_from_data(wrapper, [x, 2 * x]) == 1
    torch.testing.assert_close(wrapper(x), layer(x), rtol=1e-4, atol=1e-5)  # B = 0: still the base
    assert not adapter.lora_B.weight.any()
    p = reference_patches(layer, x).double()
    moments = 5 * p.transpose(1, 2) @ p  # x and 2x
    g, r = p.shape[0], adapter.r
    a = adapter.lora_A.weight.detach().double().reshape(g, r, -1)
    torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(r, dtype=a.dtype).expand(g, r, r) / 3)  # default norm

    def energy(rows: torch.Tensor) -> torch.Tensor:  # input energy each group's rows capture, per unit norm
        rows = rows / rows.norm(dim=2, keepdim=True)
        return torch.einsum("grd,gde,gre->g", rows, moments, rows)

    top = torch.linalg.eigvalsh(moments).flip(-1)[:, :r].sum(1)
    torch.testing.assert_close(energy(a), top, rtol=1e-6, atol=1e-9)  # the top-r subspace, per group
    if r < a.shape[2]:  # a drawn (or any other) direction captures less
        assert (energy(drawn.double().reshape(a.shape)) < top).all()


def test_eva_sets_only_active_eva_adapters_of_a_detector_and_keeps_its_output(base, images):
    model = base("yolo11n.yaml", nc=3)
    vp.inject(model, vp.LoraConfig(r=4), adapter_name="plain")
    assert vp.init_from_data(model, iter(())) == 0  # no active eva adapter: the batches are not even read
    vp.inject(model, vp.DoraConfig(r=4, init="eva"), adapter_name="eva")
    drawn = {(n, k): a.lora_A.weight.detach().clone() for n, w in adapted_modules(model) for k, a in w.adapters.items()}
    want = run(model, images)
    assert vp.init_from_data(model, [images]) == len(drawn) // 2
    torch.testing.assert_close(run(model, images), want, rtol=1e-5, atol=1e-5)
    for (n, k), a in drawn.items():
        now = model.get_submodule(n).adapters[k].lora_A.weight
        assert torch.equal(now, a) == (k == "plain"), (n, k)
    randomize_adapters(model)  # as after training: a second call would replace what was learned
    with pytest.raises(ValueError, match=r"trained already \(B != 0\); call it right after inject") as e:
        vp.init_from_data(model, [images])
    assert "\n" not in str(e.value)


# -- LoHa ------------------------------------------------------------------------------------------------------
def group_product(a: torch.Tensor, b: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """Reference ``B @ A`` per channel group, from the two factor weights, shaped like the base weight."""
    if isinstance(base, nn.Linear):
        return b @ a
    g = base.groups
    r, out_g = a.shape[0] // g, base.out_channels // g
    blocks = [b[j * out_g:(j + 1) * out_g, :, 0, 0] @ a[j * r:(j + 1) * r].flatten(1) for j in range(g)]
    return torch.cat(blocks).reshape(base.weight.shape)


@pytest.mark.parametrize("use_dora", [False, True], ids=["loha", "loha-dora"])
@pytest.mark.parametrize("kind", LAYERS)
def test_loha_output_and_exact_merge(kind, use_dora):
    layer = make_layer(kind)
    x = layer_input(layer)
    wrapper = wrap(copy.deepcopy(layer), vp.LohaConfig(r=2, alpha=4, use_dora=use_dora))
    torch.testing.assert_close(wrapper(x), layer(x), rtol=1e-5, atol=1e-6)  # starts at the base
    adapter = wrapper.adapters["a"]
    with torch.no_grad():
        adapter.w2_B.weight.normal_(0, 0.1)
        if use_dora:
            adapter.magnitude.mul_(torch.rand_like(adapter.magnitude) + 0.5)
    delta = adapter.scaling * group_product(adapter.w1_A.weight, adapter.w1_B.weight, layer) \
        * group_product(adapter.w2_A.weight, adapter.w2_B.weight, layer)
    w = layer.weight + delta
    if use_dora:
        w = adapter.magnitude * w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    y = wrapper(x)
    assert rel_err(y, layer(x)) > 1e-2
    assert rel_err(y, apply_weight(layer, x, w)) < 1e-5
    merged = wrapper.merged()
    assert type(merged) is type(layer)
    assert rel_err(merged(x), y) < 1e-5


@pytest.mark.parametrize("kind", ["3x3", "grouped", "linear"])
def test_loha_reaches_rank_r_squared_with_the_parameters_of_rank_2r(kind):
    layer = make_layer(kind)
    loha = wrap(layer, vp.LohaConfig(r=3)).adapters["a"]
    lora = wrap(layer, vp.LoraConfig(r=6)).adapters["a"]
    assert sum(p.numel() for p in loha.parameters()) == sum(p.numel() for p in lora.parameters())
    first = group_product(loha.w1_A.weight, loha.w1_B.weight, layer)
    assert float(first.detach().square().mean()) == pytest.approx(1.0, rel=1e-4)  # starts at unit RMS
    with torch.no_grad():
        loha.w2_B.weight.normal_()
    groups = getattr(layer, "groups", 1)
    delta = loha.delta_weight(layer).detach()
    for block in delta.reshape(groups, delta.shape[0] // groups, -1):
        assert torch.linalg.matrix_rank(block) == min(9, *block.shape)


# -- bottleneck adapters -----------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()).eval()


def wrap_bottleneck(block: nn.Module, x: torch.Tensor, **options) -> AdaptedModule:
    config = vp.BottleneckConfig(r=4, **options)
    with torch.no_grad():
        shapes = (x.shape, block(x).shape)
    wrapper = AdaptedModule(block)
    wrapper.add_adapter("a", config.build(block, config.r, shapes))
    return wrapper


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_bottleneck_runs_parallel_to_a_cnn_block(stride):
    block, x = conv_block(8, 16, stride), torch.randn(2, 8, 16, 16)
    wrapper = wrap_bottleneck(copy.deepcopy(block), x, act="relu", scale=0.5)
    adapter = wrapper.adapters["a"]
    assert isinstance(adapter, ConvBottleneck)
    assert torch.equal(wrapper(x), block(x))  # the up projection starts at zero

    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.1)
        adapter.up.bias.normal_(0, 0.1)
    hidden = F.relu(F.conv2d(x, adapter.down.weight, adapter.down.bias, stride, adapter.down.padding))
    expected = block(x) + 0.5 * F.conv2d(hidden, adapter.up.weight, adapter.up.bias)
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrapper(x), block(x))
    with pytest.raises(TypeError, match="cannot be merged"):
        adapter.merge_into(block)


def test_adaptformer_runs_parallel_to_a_vit_mlp():
    mlp, x = Mlp(32, 64), torch.randn(2, 5, 32)
    wrapper = wrap_bottleneck(copy.deepcopy(mlp), x, act="gelu", scale=0.1)
    adapter = wrapper.adapters["a"]
    assert isinstance(adapter, TokenBottleneck)
    assert torch.equal(wrapper(x), mlp(x))
    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.1)
    expected = mlp(x) + 0.1 * adapter.up(F.gelu(adapter.down(x)))
    torch.testing.assert_close(wrapper(x), expected)
    assert {n for n, _ in adapter.named_parameters()} == {"scale", "down.weight", "down.bias", "up.weight", "up.bias"}


def test_bottleneck_rejects_unknown_activation():
    with pytest.raises(ValueError) as e:
        vp.BottleneckConfig(act="swish")  # when the config is built, before any block is wrapped
    assert str(e.value) == "BottleneckConfig.act must be one of ['gelu', 'relu', 'silu'], got 'swish'"


# -- AMP: adapter math stays in float32 ----------------------------------------------------------------------------
def overflowing_case(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A layer and input whose LoRA intermediate ``A x`` exceeds float16's range (65504) while the result does not.

    The base weight is tiny so the base output stays small; ``A`` is large, ``B`` small: in float32 the update is
    finite and large, in float16 ``A x`` is ``inf`` and so is everything after it.
    """
    layer = nn.Linear(64, 8) if kind == "linear" else nn.Conv2d(16, 8, 3, padding=1)
    with torch.no_grad():
        layer.weight.fill_(1e-4)
        layer.bias.zero_()
    x = torch.full((2, 64) if kind == "linear" else (2, 16, 6, 6), 100.0)
    return layer, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_math_runs_in_float32_under_autocast(kind):
    layer, x = overflowing_case(kind)
    wrapper = wrap(layer, vp.LoraConfig(r=4, alpha=4))
    adapter = wrapper.adapters["a"]
    with torch.no_grad():
        adapter.lora_A.weight.fill_(20.0)
        adapter.lora_B.weight.fill_(1e-3)
    expected = wrapper(x)  # plain float32
    assert torch.isfinite(expected).all() and expected.abs().max() > 100

    with torch.autocast("cpu", dtype=torch.float16):
        half = adapter.lora_B(adapter.lora_A(x))  # what the adapter would compute without full_precision
        assert half.dtype == torch.float16 and torch.isinf(half).all(), "the test case must overflow in float16"
        y = wrapper(x)
    y.float().sum().backward()  # as AMP training does: backward outside the autocast region
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), expected) < 1e-2  # the base path itself runs in float16
    assert torch.isfinite(adapter.lora_B.weight.grad).all() and adapter.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_weight_math_runs_in_float32_under_autocast(kind):
    """DoRA computes an adapted weight: ``B @ A`` beyond float16's range would make the weight inf and NaN."""
    layer, x = overflowing_case(kind)
    wrapper = wrap(layer, vp.DoraConfig(r=4, alpha=4e-4))  # scaling 1e-4 brings the 3.6e5 product back to 36
    adapter = wrapper.adapters["a"]
    with torch.no_grad():
        adapter.lora_A.weight.fill_(300.0)
        adapter.lora_B.weight.fill_(300.0)
    expected = wrapper(x)
    assert torch.isfinite(expected).all()

    with torch.autocast("cpu", dtype=torch.float16):
        a, b = adapter.lora_A.weight.flatten(1), adapter.lora_B.weight.flatten(1)
        assert torch.isinf(b[:, :4] @ a[:4]).all(), "the test case must overflow in float16"
        y = wrapper(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), expected) < 1e-2
    assert torch.isfinite(adapter.lora_B.weight.grad).all() and torch.isfinite(adapter.magnitude.grad).all()


def test_bottleneck_math_runs_in_float32_under_autocast():
    block = nn.Linear(64, 8)
    with torch.no_grad():
        block.weight.fill_(1e-4)
    x = torch.full((2, 64), 100.0)
    wrapper = wrap_bottleneck(block, x, act="relu", scale=1.0)
    adapter = wrapper.adapters["a"]
    with torch.no_grad():
        adapter.down.weight.fill_(20.0)
        adapter.up.weight.fill_(1e-3)
    expected = wrapper(x)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isinf(adapter.up(adapter.act(adapter.down(x)))).all()
        y = wrapper(x)
    assert torch.isfinite(y).all()
    assert rel_err(y.float(), expected) < 1e-2


# -- configs ---------------------------------------------------------------------------------------------------------
def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['rank'\] for method 'lora'.*'alpha'.*'r'"):
        config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ValueError, match="'act'"):
        vp.BottleneckConfig.from_dict({"activation": "relu"})


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"Unknown adapter method 'lokr'.*\['bottleneck', 'dora', 'loha', 'lora'"):
        config_from_dict({"method": "lokr", "r": 8})
    with pytest.raises(ValueError, match="Unknown adapter method 'None'"):
        config_from_dict({"r": 8})


# Every numeric or enum field, with a bad value and the message naming the field and its valid range.
BAD_FIELDS = [
    (vp.LoraConfig, {"r": 0}, "LoraConfig.r must be an integer >= 1, got 0"),
    (vp.LoraConfig, {"r": -4}, "LoraConfig.r must be an integer >= 1, got -4"),
    (vp.LoraConfig, {"r": 2.5}, "LoraConfig.r must be an integer >= 1, got 2.5"),
    (vp.LoraConfig, {"r": True}, "LoraConfig.r must be an integer >= 1, got True"),
    (vp.LoraConfig, {"r": "8"}, "LoraConfig.r must be an integer >= 1, got '8' (a string"),
    (vp.DoraConfig, {"r": 0}, "DoraConfig.r must be an integer >= 1, got 0"),
    (vp.LoraConfig, {"alpha": 0}, "LoraConfig.alpha must be a number > 0, got 0"),
    (vp.DoraConfig, {"alpha": -16}, "DoraConfig.alpha must be a number > 0, got -16"),
    (vp.LoraConfig, {"alpha": float("nan")}, "LoraConfig.alpha must be a number > 0, got nan"),
    (vp.LoraConfig, {"alpha": "1e3"}, "LoraConfig.alpha must be a number > 0, got '1e3' (a string"),
    (vp.LoraConfig, {"dropout": 1.0}, "LoraConfig.dropout must be a number in [0, 1), got 1.0"),
    (vp.LoraConfig, {"dropout": -0.1}, "LoraConfig.dropout must be a number in [0, 1), got -0.1"),
    (vp.LohaConfig, {"r": 0}, "LohaConfig.r must be an integer >= 1, got 0"),
    (vp.LohaConfig, {"use_dora": "yes"}, "LohaConfig.use_dora must be true or false, got 'yes'"),
    (vp.DoraConfig, {"init": "gaussian"}, "DoraConfig.init must be one of ['zero', 'pissa', 'eva'], got 'gaussian'"),
    (vp.BottleneckConfig, {"r": 0}, "BottleneckConfig.r must be an integer >= 1, got 0"),
    (vp.BottleneckConfig, {"scale": 0}, "BottleneckConfig.scale must be a number != 0, got 0"),
    (vp.BottleneckConfig, {"scale": float("inf")}, "BottleneckConfig.scale must be a number != 0, got inf"),
    (vp.LoraConfig, {"rank_pattern": {"cv2": 0}}, "LoraConfig.rank_pattern['cv2'] must be an integer >= 1, got 0"),
    (vp.BottleneckConfig, {"rank_pattern": {"cv2": -1}}, "rank_pattern['cv2'] must be an integer >= 1, got -1"),
    (vp.LoraConfig, {"rank_pattern": {"cv2[": 4}}, "LoraConfig.rank_pattern: 'cv2[' is not a valid regex"),
    (vp.LoraConfig, {"rank_pattern": [4]}, "LoraConfig.rank_pattern must be a mapping {regex: rank}"),
    (vp.NormStatsConfig, {"rank_pattern": {"bn": 4}}, "NormStatsConfig.rank_pattern sets ranks, but method"),
    (vp.TrainableConfig, {"rank_pattern": {"bn": 4}}, "TrainableConfig.rank_pattern sets ranks"),
    (vp.LoraConfig, {"layers": [5, -1]}, "LoraConfig.layers must be an integer >= 0, got -1"),
    (vp.NormStatsConfig, {"layers": []}, "NormStatsConfig.layers must be a non-empty list of layer indices"),
    (vp.TrainableConfig, {"layers": "23-5"}, "TrainableConfig.layers must be indices and ascending ranges"),
    (vp.LoraConfig, {"layers": [1.5]}, "LoraConfig.layers must be an integer >= 0, got 1.5"),
    (vp.LoraConfig, {"target_modules": ["model.(0"]}, "LoraConfig.target_modules: 'model.(0' is not a valid regex"),
    (vp.LoraConfig, {"target_modules": [3]}, "LoraConfig.target_modules must be a list of regexes"),
    (vp.DoraConfig, {"exclude_modules": ["dfl["]}, "DoraConfig.exclude_modules: 'dfl[' is not a valid regex"),
    (vp.BottleneckConfig, {"target_types": [""]}, "BottleneckConfig.target_types must be a list of class names"),
]


@pytest.mark.parametrize(("cls", "options", "message"), BAD_FIELDS, ids=[f"{c.__name__}-{o}" for c, o, _ in BAD_FIELDS])
def test_bad_field_fails_when_the_config_is_built(cls, options, message):
    with pytest.raises(ValueError) as e:
        cls(**options)
    assert message in str(e.value) and "\n" not in str(e.value)  # names the field and its range, on one line
    with pytest.raises(ValueError) as e:  # the dict route (YAML configs, adapter metadata) too
        config_from_dict({"method": cls.method, **options})
    assert message in str(e.value)


def test_good_fields_are_normalised():
    import numpy as np

    config = vp.LoraConfig(r=np.int64(4), alpha=np.float32(8), dropout=0, layers=23, target_modules="qkv",
                           exclude_modules=None, rank_pattern=None)
    assert (config.r, config.alpha, config.layers, config.target_modules) == (4, 8.0, [23], ["qkv"])
    assert type(config.r) is int and type(config.alpha) is float  # plain types: the config goes to JSON metadata
    assert config.exclude_modules == [] and config.rank_pattern == {}
    assert vp.BottleneckConfig(scale=-0.5, rank_pattern={"cv2": 2}).rank_pattern == {"cv2": 2}
    assert vp.TrainableConfig(layers="0,1").layers == [0, 1]


def test_config_round_trips_through_its_dict():
    config = vp.DoraConfig(r=4, alpha=2.0, layers=[1, 2], exclude_modules=["x"], rank_pattern={"cv2": 2})
    assert config_from_dict(config.to_dict()) == config


# -- per-adapter BatchNorm statistics ---------------------------------------------------------------------------
def pretrained_bn(c: int = 8) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=0.03)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.requires_grad_(False)


def test_norm_stats_learns_the_new_statistics_and_leaves_the_base_alone():
    bn = pretrained_bn()
    base_stats = (bn.running_mean.clone(), bn.running_var.clone())
    wrapper = wrap(bn, config_from_dict({"method": "norm_stats"}))
    adapter = wrapper.adapters["a"]
    assert not list(adapter.parameters())  # nothing to train: a forward-only update
    x = torch.randn(16, 8, 6, 6) * 3 + 2  # another domain: other means and variances
    wrapper.train()
    out = wrapper(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    ref = (x - mean[:, None, None]) / (var[:, None, None] + bn.eps).sqrt() * bn.weight[:, None, None] \
        + bn.bias[:, None, None]
    assert rel_err(out, ref) < 1e-5  # batch statistics with the base's affine weights
    torch.testing.assert_close(adapter.running_mean, 0.97 * base_stats[0] + 0.03 * mean)
    assert torch.equal(bn.running_mean, base_stats[0]) and torch.equal(bn.running_var, base_stats[1])


def test_norm_stats_uses_its_statistics_in_eval_and_merges_exactly():
    bn = pretrained_bn()
    wrapper = wrap(bn, config_from_dict({"method": "norm_stats"})).train()
    for _ in range(5):
        wrapper(torch.randn(16, 8, 6, 6) * 2 - 1)
    wrapper.eval()
    x = torch.randn(2, 8, 6, 6)
    adapted = wrapper(x)
    assert rel_err(adapted, bn.eval()(x)) > 1e-2
    merged = copy.deepcopy(wrapper).merged().eval()
    assert type(merged) is nn.BatchNorm2d
    assert rel_err(merged(x), adapted) < 1e-6


def test_norm_stats_renorm_trains_with_evals_forward_and_batchnorms_gradient():
    bn = pretrained_bn()
    base_stats = (bn.running_mean.clone(), bn.running_var.clone())
    renorm = wrap(bn, config_from_dict({"method": "norm_stats", "normalize": "renorm"})).train()
    x = (torch.randn(16, 8, 6, 6, dtype=torch.float64) * 3 + 2).requires_grad_()
    renorm.double()
    before = copy.deepcopy(renorm).eval()
    out = renorm(x)
    assert rel_err(out, before(x)) < 1e-10  # the forward: the running statistics before this batch, as in eval
    adapter = renorm.adapters["a"]
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(adapter.running_mean, 0.97 * base_stats[0].double() + 0.03 * mean)
    torch.testing.assert_close(adapter.running_var, 0.97 * base_stats[1].double() + 0.03 * var)
    # the gradient: BatchNorm's through the batch statistics, scaled by r = batch std / running std
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    xb = x.detach().requires_grad_()
    batch = F.batch_norm(xb, None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps)
    (gb,) = torch.autograd.grad(batch, xb, g)
    r = ((x.detach().var((0, 2, 3), unbiased=False) + bn.eps) / (base_stats[1].double() + bn.eps)).sqrt()
    assert rel_err(gx, gb * r[:, None, None]) < 1e-10
    assert torch.equal(bn.running_mean, base_stats[0]) and torch.equal(bn.running_var, base_stats[1])
    with pytest.raises(ValueError, match=r"NormStatsConfig.normalize must be one of \['batch', 'renorm'\]"):
        config_from_dict({"method": "norm_stats", "normalize": "running"})


@pytest.mark.parametrize("method", ["norm_stats", "shift"])
def test_batchnorm_methods_reject_other_layers(method):
    with pytest.raises(TypeError, match="BatchNorm"):
        wrap(nn.Conv2d(3, 8, 3), config_from_dict({"method": method}))


# -- per-channel shift (BitFit) ------------------------------------------------------------------------------
def test_shift_starts_at_the_base_trains_one_bias_and_merges_exactly():
    bn = pretrained_bn()
    base_state = {k: v.clone() for k, v in bn.state_dict().items()}
    wrapper = wrap(bn, config_from_dict({"method": "shift"}))
    adapter = wrapper.adapters["a"]
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["bias"]
    x = torch.randn(4, 8, 6, 6)
    wrapper.eval()  # as the trainer keeps frozen BatchNorms
    out = wrapper(x)
    torch.testing.assert_close(out, bn(x), rtol=0, atol=0)  # zero start: the base exactly
    out.square().sum().backward()  # a bias's gradient: the output gradient summed per channel
    torch.testing.assert_close(adapter.bias.grad, (2 * out).sum((0, 2, 3)).detach())
    with torch.no_grad():
        adapter.bias.normal_()
    wrapper.eval()
    adapted = wrapper(x)
    assert rel_err(adapted, bn.eval()(x)) > 1e-2
    assert all(torch.equal(v, base_state[k]) for k, v in bn.state_dict().items())  # the base never moves
    merged = copy.deepcopy(wrapper).merged().eval()
    assert type(merged) is nn.BatchNorm2d
    assert rel_err(merged(x), adapted) < 1e-6


def test_layers_accept_ranges():
    assert config_from_dict({"method": "lora", "layers": "5-8"}).layers == [5, 6, 7, 8]
    assert config_from_dict({"method": "dora", "layers": "0, 2, 9-10"}).layers == [0, 2, 9, 10]
    with pytest.raises(ValueError, match="5-23"):
        config_from_dict({"method": "lora", "layers": "five"})


# -- scaling an update toward the base (vp.scale_adapter) --------------------------------------------------------
def trained_wrapper(method: str) -> tuple[AdaptedModule, torch.Tensor]:
    """A wrapper with a non-zero update of each method, and an input for it."""
    torch.manual_seed(0)
    if method == "bottleneck":
        block, x = conv_block(8, 16, 1), torch.randn(2, 8, 9, 9)
        wrapper = wrap_bottleneck(block, x)
        with torch.no_grad():
            wrapper.adapters["a"].up.weight.normal_(0, 0.1)
        return wrapper, x
    if method in ("shift", "norm_stats"):
        bn = nn.BatchNorm2d(6).eval()
        wrapper, x = wrap(bn, config_from_dict({"method": method})), torch.randn(2, 6, 5, 5)
        with torch.no_grad():
            for t in (*wrapper.adapters["a"].parameters(), *wrapper.adapters["a"].buffers()):
                t.add_(torch.rand(t.shape) * 0.3 + 0.1)
        return wrapper, x
    layer = make_conv("3x3")
    wrapper = wrap(layer, config_from_dict({"method": method, **({"r": 2} if method != "trainable" else {})}))
    with torch.no_grad():
        for name, p in wrapper.adapters["a"].named_parameters():
            if method == "trainable" or name != "lora_A.weight":
                p.add_(torch.randn(p.shape) * 0.1)
    return wrapper, layer_input(layer)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "bottleneck", "shift", "norm_stats", "trainable"])
@torch.no_grad()
def test_scaling_an_update_to_zero_gives_the_base_and_to_one_keeps_it(method):
    wrapper, x = trained_wrapper(method)
    wrapper.eval()
    y_base, y = wrapper.base_layer(x), wrapper(x)
    assert rel_err(y, y_base) > 1e-2
    adapter = wrapper.adapters["a"]
    kept = copy.deepcopy(adapter)
    kept.scale_update_(wrapper.base_layer, 1.0)
    assert rel_err(kept(wrapper.base_layer, x), y) < 1e-6
    adapter.scale_update_(wrapper.base_layer, 0.0)
    assert rel_err(wrapper(x), y_base) < 1e-5


def test_scaling_refuses_a_pissa_start_and_a_reinitialised_module():
    layer = make_conv("3x3")
    with pytest.raises(TypeError, match="PiSSA-initialised adapter cannot scale its update"):
        wrap(layer, vp.LoraConfig(r=2, init="pissa")).adapters["a"].scale_update_(layer, 0.5)
    replacement = vp.TrainableConfig().build(nn.Conv2d(8, 3, 1), 0)  # a class output for other classes
    with pytest.raises(TypeError, match="has no base to scale toward"):
        replacement.scale_update_(nn.Conv2d(8, 80, 1), 0.5)


@pytest.mark.parametrize("base", [nn.Conv2d(16, 24, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Linear(20, 12)],
                         ids=["conv", "depthwise", "linear"])
def test_rounded_file_refits_a_to_the_rounded_b(base):
    """LoRA/DoRA files round B, then A refit to it (least squares per group): the stored product is closer to the
    trained one than with A as trained; B stays as trained (the file rounds it); a group whose rounded B is zero
    keeps its A (a refit would set it to zero, and an untrained factor pair could never move again)."""
    from visionpeft import blockquant
    from visionpeft.methods.lora import compose_weight, low_rank_pair, refit_a_to_rounded_b

    torch.manual_seed(0)
    a, b = low_rank_pair(base, 1 if getattr(base, "groups", 1) > 1 else 4)
    nn.init.normal_(b.weight, std=0.05)
    if isinstance(base, nn.Conv2d) and base.groups > 1:
        b.weight.data[:2] = 0  # filters whose factor never trained
    sd = {"lora_A.weight": a.weight.detach().clone(), "lora_B.weight": b.weight.detach().clone(), "other": b.weight}
    out = refit_a_to_rounded_b(sd, lambda t: blockquant.round_trip(t, 4))
    assert out["lora_B.weight"] is sd["lora_B.weight"] and out["other"] is sd["other"]
    b_round = blockquant.round_trip(sd["lora_B.weight"], 4)
    trained = compose_weight(sd["lora_A.weight"], sd["lora_B.weight"], base)
    as_trained = (compose_weight(sd["lora_A.weight"], b_round, base) - trained).norm()
    refit = (compose_weight(out["lora_A.weight"], b_round, base) - trained).norm()
    assert refit < 0.9 * as_trained
    stored = compose_weight(blockquant.round_trip(out["lora_A.weight"], 4), b_round, base)
    plain = compose_weight(blockquant.round_trip(sd["lora_A.weight"], 4), b_round, base)
    assert (stored - trained).norm() < (plain - trained).norm()
    if isinstance(base, nn.Conv2d) and base.groups > 1:
        assert torch.equal(out["lora_A.weight"][:2], sd["lora_A.weight"][:2])
        assert not torch.equal(out["lora_A.weight"][2:], sd["lora_A.weight"][2:])
    assert refit_a_to_rounded_b({"lora_A.weight": sd["lora_A.weight"]}, torch.round) == {
        "lora_A.weight": sd["lora_A.weight"]}  # a PiSSA adapter (nothing rounded) or another method's keys
