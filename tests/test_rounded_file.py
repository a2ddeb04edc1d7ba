"""Adapter files with block-rounded low-rank factors (``save_adapter(..., bits=8|4)``, ``peft.file_bits``)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import VIT, VIT_KWARGS, randomize_adapters, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft import blockquant
from visionpeft.inject import adapted_modules
from visionpeft.models import resolve_weights


@pytest.mark.parametrize("bits", blockquant.BITS)
def test_rounding_is_within_half_a_step_of_each_blocks_scale(bits):
    t = torch.randn(7, 5, 3, 3) * torch.logspace(-3, 1, 7)[:, None, None, None]  # rows of very different scales
    t[0] = 0  # an all-zero block stays zero
    data, scales = blockquant.quantize(t, bits)
    blocks = math.ceil(t.numel() / blockquant.BLOCK)
    assert data.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(data.shape) == (blocks, blockquant.BLOCK * bits // 8) and scales.dtype == torch.float16
    back = blockquant.dequantize(data, scales, bits, list(t.shape))
    step = scales.float().repeat_interleave(blockquant.BLOCK)[: t.numel()].reshape(t.shape)
    assert back.dtype == torch.float32 and back.shape == t.shape
    assert ((back - t).abs() <= 0.5 * step + 1e-7).all()
    assert not back[0].any()
    assert torch.equal(back.half().float(), back)  # float16 numbers: float16 copies of the factors lose nothing
    assert float((back - t).norm() / t.norm()) < (0.01 if bits == 8 else 0.15)


def test_dequantize_refuses_parts_that_do_not_fit():
    data, scales = blockquant.quantize(torch.randn(100), 4)
    with pytest.raises(ValueError, match="data of shape"):
        blockquant.dequantize(data, scales, 4, [200])
    with pytest.raises(ValueError, match="data of shape"):
        blockquant.dequantize(data, scales, 8, [100])
    with pytest.raises(ValueError, match="scales"):
        blockquant.dequantize(data, scales[:-1], 4, [100])
    with pytest.raises(ValueError, match="bits must be one of"):
        blockquant.quantize(torch.randn(4), 2)
    with pytest.raises(ValueError, match="do not fit float16"):
        blockquant.quantize(torch.tensor([1e9]), 8)


def dora_model(base):
    model = vp.inject(base("yolo11n.pt"), vp.DoraConfig(r=4), adapter_name="task", names=["crop", "weed"])
    randomize_adapters(model)
    return model


def rounded_in_memory(model, factors: set[str], bits: int, dtype: torch.dtype = torch.float32):
    """A copy of ``model`` whose adapter "task" holds what a rounded file gives back: each method's tensors cast to
    ``dtype``, prepared by its ``before_rounding``, then each of ``factors`` rounded on its own."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, wrapper in adapted_modules(model):
            adapter = wrapper.adapters["task"]
            sd = {k: t.to(dtype) for k, t in adapter.state_dict().items()}
            sd = adapter.before_rounding(sd, lambda t: blockquant.round_trip(t, bits))  # noqa: B023
            for key, t in adapter.state_dict(keep_vars=True).items():
                value = sd[key].float()
                t.copy_(blockquant.round_trip(value, bits) if f"{name}/{key}" in factors else value)
    return model


@pytest.mark.parametrize("bits", blockquant.BITS)
def test_rounded_file_stores_the_factors_in_blocks_and_loads_them_back(base, images, tmp_path, bits):
    model = dora_model(base)
    half = vp.save_adapter(model, tmp_path / "fp16.safetensors", dtype=torch.float16)
    path = vp.save_adapter(model, tmp_path / "q.safetensors", dtype=torch.float16, bits=bits)
    raw = load_file(path)
    meta = json.loads(safe_open(str(path), "pt").metadata()["visionpeft"])
    factors = {k for k in load_file(half) if k.endswith(("lora_A.weight", "lora_B.weight"))}
    assert set(meta["rounded"]["tensors"]) == factors and meta["rounded"]["bits"] == bits
    assert all(raw[k].dtype in (torch.int8, torch.uint8) for k in factors)
    assert all(v.dtype == torch.float16 for k, v in raw.items() if k not in factors)  # magnitudes, class outputs
    # 4.5 or 8.5 bits per factor value against float16's 16 (blocks padded to 32 values); the header grows by the
    # scales' entries and the record of shapes, ~100 bytes per factor
    for k in factors:
        blocks = math.ceil(load_file(half)[k].numel() / blockquant.BLOCK)
        assert raw[k].numel() * raw[k].element_size() == blocks * blockquant.BLOCK * bits // 8
        assert raw[k + ".block_scales"].numel() == blocks
    data = sum(v.numel() * v.element_size() for v in raw.values())
    assert path.stat().st_size < data + len(json.dumps(meta)) + 200 * len(raw)
    assert path.stat().st_size < (0.7 if bits == 8 else 0.5) * half.stat().st_size

    tensors, read_meta = vp.read_adapter(path)
    assert set(tensors) == set(load_file(half)) and read_meta["rounded"] == meta["rounded"]
    fresh = vp.load_adapter(vp.load_base(resolve_weights("yolo11n.pt")), path)
    state = dict(adapted_modules(model))
    for name, wrapper in adapted_modules(fresh):
        for key, value in wrapper.adapters["task"].state_dict().items():
            original = state[name].adapters["task"].state_dict()[key]
            if f"{name}/{key}" in factors and key.startswith("lora_B"):  # half a step (a block's scale: its
                top = original.abs().max()  # max / qmax rounded up to 12 - bits significant bits), after the
                # float16 cast (2^-11); A is refit to the rounded B first (test_methods), so only their product
                # stays close
                bound = 0.5 * top / (2 ** (bits - 1) - 1) * (1 + 2.0 ** (bits - 11)) + top * 2**-11 + 1e-7
                assert (value - original).abs().max() <= bound, (name, key)
            elif f"{name}/{key}" not in factors:
                assert torch.equal(value, original.half().float()), (name, key)
    expected = rounded_in_memory(model, factors, bits, torch.float16)  # the same network, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(run(fresh, images), run(expected, images), strict=True))


def test_loha_rounds_its_four_factors_and_pissa_none(base, tmp_path):
    loha = vp.inject(base("yolo11n.pt"), vp.LohaConfig(r=2, use_dora=True), adapter_name="t", names=["a"])
    meta = vp.read_adapter(vp.save_adapter(loha, tmp_path / "loha.safetensors", bits=4))[1]
    assert {k.rsplit("/", 1)[1] for k in meta["rounded"]["tensors"]} == {"w1_A.weight", "w1_B.weight",
                                                                        "w2_A.weight", "w2_B.weight"}
    # PiSSA's factors hold the weights' principal part: rounding them would move the layer far more than the update
    pissa = vp.inject(base("yolo11n.pt"), vp.DoraConfig(r=4, init="pissa", layers=[0, 1]), adapter_name="t")
    meta = vp.read_adapter(vp.save_adapter(pissa, tmp_path / "pissa.safetensors", bits=4))[1]
    rounded = {k.split("/")[0] for k in meta["rounded"]["tensors"]}
    assert "model.0.conv" not in rounded and "model.1.conv" not in rounded


def test_corrupt_rounded_tensors_are_refused_in_one_line(base, tmp_path):
    path = vp.save_adapter(dora_model(base), tmp_path / "q.safetensors", bits=4)
    tensors, metadata = load_file(path), safe_open(str(path), "pt").metadata()
    meta = json.loads(metadata["visionpeft"])
    key = sorted(meta["rounded"]["tensors"])[0]

    def write(t: dict, m: dict) -> str:
        out = tmp_path / "bad.safetensors"
        save_file(t, out, metadata={"visionpeft": json.dumps(m)})
        return str(out)

    bad_shape = json.loads(json.dumps(meta))
    bad_shape["rounded"]["tensors"][key] = [10**6]
    no_scales = {k: v for k, v in tensors.items() if k != key + ".block_scales"}
    inf_scales = {**tensors, key + ".block_scales": torch.full_like(tensors[key + ".block_scales"], math.inf)}
    for t, m in ((tensors, bad_shape), (no_scales, meta), (inf_scales, meta)):
        with pytest.raises(vp.AdapterFileError, match="corrupt rounded tensors") as e:
            vp.read_adapter(write(t, m))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="bits must be one of"):
        vp.save_adapter(dora_model(base), tmp_path / "x.safetensors", bits=3)


def test_vit_lora_file_rounds_its_linear_factors(base, tmp_path):
    """timm ViT LoRA (Linear factors, new classes): the same layout, reloaded onto the same random-weight ViT."""
    plain = base(VIT, **VIT_KWARGS)
    model = vp.inject(copy.deepcopy(plain), vp.LoraConfig(r=4), adapter_name="task", names=["a", "b", "c"])
    randomize_adapters(model)
    path = vp.save_adapter(model, tmp_path / "vit.safetensors", bits=4)
    rounded = vp.read_adapter(path)[1]["rounded"]["tensors"]
    assert rounded and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in rounded)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fresh = vp.load_adapter(copy.deepcopy(plain), path)
    expected = rounded_in_memory(model, set(rounded), 4)
    assert all(torch.equal(a, b) for a, b in zip(run(fresh, images), run(expected, images), strict=True))
