"""Adapter files: contents, metadata, bit-exact reload, base fingerprint check, clear errors, several adapters."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import VIT, VIT_KWARGS, max_rel_diff, randomize_adapters, run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.inject import adapted_modules
from visionpeft.models import resolve_weights

CASES = {  # name: (base source, methods, class names)
    "yolo11-lora-new-classes": ("yolo11n.pt", [vp.LoraConfig(r=4)], ["crop", "weed"]),
    "yolov8-dora": ("yolov8n.pt", [vp.DoraConfig(r=2)], None),
    "yolo11-dora-pissa-new-classes": ("yolo11n.pt", [vp.DoraConfig(r=4, init="pissa")], ["crop", "weed"]),
    "yolo11-loha-dora-new-classes": ("yolo11n.pt", [vp.LohaConfig(r=2, use_dora=True)], ["crop", "weed"]),
    "yolo11-bottleneck-and-lora": ("yolo11n.yaml", [vp.BottleneckConfig(r=4), vp.LoraConfig(r=2, layers=[23])],
                                   None),
    "yolo11-dora-norm-stats-new-classes": ("yolo11n.pt", [vp.DoraConfig(r=2), vp.NormStatsConfig(normalize="renorm")],
                                           ["crop", "weed"]),
    "vit-lora-new-classes": (VIT, [vp.LoraConfig(r=4)], ["a", "b", "c"]),
    "vit-loha-new-classes": (VIT, [vp.LohaConfig(r=2)], ["a", "b", "c"]),
}


def load(base, source: str):
    return base(source, **VIT_KWARGS) if source == VIT else base(source)


def trained(base, case: str):
    """A base and the same base with a random (non-zero) adapter, as after training."""
    source, configs, names = CASES[case]
    plain = load(base, source)
    model = vp.inject(copy.deepcopy(plain), configs, adapter_name="task", names=names)
    randomize_adapters(model)
    return plain, model


@pytest.mark.parametrize("case", CASES)
def test_reload_onto_a_fresh_base_is_bit_exact(base, images, tmp_path, case):
    plain, model = trained(base, case)
    path = vp.save_adapter(model, tmp_path / "task.safetensors")
    fresh = vp.load_base(resolve_weights(CASES[case][0])) if CASES[case][0].endswith(".pt") else plain
    vp.load_adapter(fresh, path)
    assert vp.peft_state(fresh)["active"] == "task"
    expected, actual = run(model, images), run(fresh, images)
    assert len(expected) == len(actual)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))


def test_file_holds_only_adapter_and_trainable_module_tensors(base, tmp_path):
    plain, model = trained(base, "yolo11-lora-new-classes")
    path = vp.save_adapter(model, tmp_path / "a.safetensors")
    tensors = load_file(path)
    expected = {f"{m}/{k}" for m, w in adapted_modules(model) for k in w.adapters["task"].state_dict()}
    assert set(tensors) == expected
    assert {k.rsplit("/", 1)[1] for k in tensors} == {"lora_A.weight", "lora_B.weight", "module.weight",
                                                    "module.bias"}  # LoRA + the re-initialised class outputs
    assert sum(k.endswith("module.weight") for k in tensors) == 3
    assert all(v.dtype == torch.float32 for v in tensors.values())
    state = model.state_dict()
    for key, value in tensors.items():
        module, _, tensor = key.partition("/")
        assert torch.equal(value, state[f"{module}.adapters.task.{tensor}"])
    assert sum(v.numel() for v in tensors.values()) == vp.trainable_report(model).trainable


def test_metadata_describes_adapter_and_base(base, tmp_path):
    plain, model = trained(base, "yolo11-lora-new-classes")
    path = vp.save_adapter(model, tmp_path / "a.safetensors", extra={"base": "yolo11n.pt"})
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["visionpeft"])
    assert meta["format"] == "visionpeft.adapter.v1"
    assert meta["visionpeft_version"] == vp.__version__
    assert meta["family"] == "yolo" and meta["adapter_name"] == "task" and meta["base"] == "yolo11n.pt"
    assert meta["fingerprint"] == vp.fingerprint(plain)
    assert meta["configs"] == [vp.peft_state(model)["adapters"]["task"]["configs"][0]]
    assert meta["configs"][0]["method"] == "lora" and meta["configs"][0]["r"] == 4
    assert meta["targets"]["model.23.cv3.0.2"] == "trainable" and meta["targets"]["model.0.conv"] == "lora"
    assert {int(k): v for k, v in meta["names"].items()} == {0: "crop", 1: "weed"}
    assert vp.read_adapter(path)[1] == meta


def test_adapter_file_is_small_next_to_the_full_checkpoint(base, tmp_path):
    _, model = trained(base, "yolo11-lora-new-classes")
    adapter = vp.save_adapter(model, tmp_path / "a.safetensors").stat().st_size
    checkpoint = resolve_weights("yolo11n.pt").stat().st_size  # the full model a fine-tune would otherwise ship
    params = vp.trainable_report(model).trainable
    assert params * 4 < adapter < params * 4 + 64 * 1024  # fp32 tensors plus a small header
    assert adapter < 0.25 * checkpoint, f"adapter {adapter / 1e6:.2f} MB vs checkpoint {checkpoint / 1e6:.2f} MB"


def test_float16_file_is_half_the_size_and_loads_back_into_float32(base, images, tmp_path):
    plain, model = trained(base, "yolo11-lora-new-classes")
    full = vp.save_adapter(model, tmp_path / "fp32.safetensors")
    half = vp.save_adapter(model, tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}
    assert half.stat().st_size < 0.55 * full.stat().st_size
    fresh = vp.load_adapter(vp.load_base(resolve_weights("yolo11n.pt")), half)
    assert {p.dtype for p in fresh.parameters()} == {torch.float32}
    expected, actual = run(model, images), run(fresh, images)
    # float16 rounds each value by up to 2^-11; through the network the outputs move ~1e-3 (0.6-1.1e-3 over six
    # draws of the factors), a wrongly loaded tensor by far more
    assert max_rel_diff(actual, expected) < 3e-3


def test_pissa_file_holds_no_start_and_a_reload_checks_the_one_it_recomputes(base, images, tmp_path):
    plain, model = trained(base, "yolo11-dora-pissa-new-classes")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B near its start, as after training (randomize_adapters drew it around zero)
        for _, wrapper in adapted_modules(model):
            adapter = wrapper.adapters["task"]
            if hasattr(adapter, "init_B"):
                adapter.lora_B.weight.copy_(adapter.init_B * (1 + 0.1 * torch.randn(adapter.init_B.shape, generator=g)))
    path = vp.save_adapter(model, tmp_path / "pissa.safetensors", dtype=torch.float16)
    tensors = load_file(path)
    zero = vp.inject(copy.deepcopy(plain), vp.DoraConfig(r=4), adapter_name="task", names=["crop", "weed"])
    zero_keys = set(load_file(vp.save_adapter(zero, tmp_path / "zero.safetensors", dtype=torch.float16)))
    digests = {k for k in tensors if k.endswith("/init_digest")}
    assert digests and set(tensors) - digests == zero_keys  # the zero init's tensors: the start is recomputed
    assert sum(tensors[k].numel() for k in digests) < 0.02 * sum(v.numel() for v in tensors.values())
    fresh = vp.load_adapter(vp.load_base(resolve_weights("yolo11n.pt")), path)
    # fp16 factors the size of the weights' principal part: about the rounding of an fp16 checkpoint (best.pt)
    assert max_rel_diff(run(fresh, images), run(model, images)) < 1e-2

    key = sorted(digests)[0]  # a start recomputed otherwise (other signs, another subspace) is refused
    tensors[key] = -tensors[key]
    save_file(tensors, tmp_path / "other.safetensors", metadata=safe_open(str(path), "pt").metadata())
    other = vp.load_base(resolve_weights("yolo11n.pt"))
    with pytest.raises(vp.AdapterFileError, match=f"at '{key.split('/')[0]}': the PiSSA start recomputed"):
        vp.load_adapter(other, tmp_path / "other.safetensors")
    assert not hasattr(other, "visionpeft"), "a refused adapter must leave the model untouched"


def test_load_under_another_name_and_keep_the_active_adapter(base, images, tmp_path):
    plain, model = trained(base, "yolov8-dora")
    path = vp.save_adapter(model, tmp_path / "a.safetensors")
    vp.inject(plain, vp.LoraConfig(r=2), adapter_name="other")
    vp.load_adapter(plain, path, adapter_name="renamed", activate=False)
    assert vp.peft_state(plain)["active"] == "other"
    vp.set_adapter(plain, "renamed")
    assert all(torch.equal(a, b) for a, b in zip(run(plain, images), run(model, images), strict=True))


def test_loading_onto_another_base_names_both_fingerprints(base, tmp_path):
    _, model = trained(base, "yolo11-lora-new-classes")
    path = vp.save_adapter(model, tmp_path / "a.safetensors")
    expected = vp.fingerprint(base("yolo11n.pt"))
    for other in (base("yolov8n.pt"), base("yolo11n.yaml", nc=80)):  # another architecture; same one, other weights
        actual = vp.fingerprint(other)
        with pytest.raises(vp.AdapterFileError) as e:
            vp.load_adapter(other, path)
        message = str(e.value)
        assert "trained on another base model" in message
        assert str(expected) in message and str(actual) in message
        assert not hasattr(other, "visionpeft"), "a refused adapter must leave the model untouched"
    assert expected["architecture"] == vp.fingerprint(base("yolo11n.yaml", nc=80))["architecture"]


def test_unreadable_files_raise_clear_errors(base, tmp_path):
    _, model = trained(base, "yolov8-dora")
    good = vp.save_adapter(model, tmp_path / "good.safetensors")
    data = good.read_bytes()

    with pytest.raises(vp.AdapterFileError, match="Adapter file not found: '.*missing.safetensors'"):
        vp.load_adapter(copy.deepcopy(model), tmp_path / "missing.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7 + b"not a safetensors file")
    for path in (truncated, garbage):
        with pytest.raises(vp.AdapterFileError, match="not a readable safetensors file .corrupt or truncated"):
            vp.read_adapter(path)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(vp.AdapterFileError, match="a safetensors file but not a visionpeft adapter"):
        vp.read_adapter(foreign)

    broken_meta = tmp_path / "broken_meta.safetensors"
    save_file(load_file(good), broken_meta, metadata={"visionpeft": "{not json"})
    with pytest.raises(vp.AdapterFileError, match="corrupt visionpeft metadata"):
        vp.read_adapter(broken_meta)


def test_file_whose_tensors_do_not_fit_is_refused(base, tmp_path):
    plain, model = trained(base, "yolov8-dora")
    good = vp.save_adapter(model, tmp_path / "good.safetensors")
    tensors, meta = vp.read_adapter(good)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, partial, metadata={"visionpeft": json.dumps(meta)})
    before = copy.deepcopy(plain)
    with pytest.raises(vp.AdapterFileError, match=f"does not fit this model: missing \\['{dropped}'\\]"):
        vp.load_adapter(plain, partial)
    # the failed load leaves the model as it was: no half-loaded adapter, the same class and state dict
    assert not hasattr(plain, "visionpeft") and type(plain) is type(before)
    assert plain.state_dict().keys() == before.state_dict().keys()


def test_norm_stats_file_keeps_one_entry_per_batchnorm_and_reads_the_two_entry_layout(base, images, tmp_path):
    """A BatchNorm's two statistics are one ``(2, C)`` tensor in the file (each entry's header costs about 50
    float16 values); a file of the first build, with ``running_mean`` and ``running_var`` apart, loads the same."""
    plain, model = trained(base, "yolo11-dora-norm-stats-new-classes")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # statistics of another domain, as training leaves them
        for _, w in adapted_modules(model):
            if hasattr(w.adapters["task"], "stats"):
                w.adapters["task"].stats.mul_(1 + 0.2 * torch.rand(w.adapters["task"].stats.shape, generator=g))
    path = vp.save_adapter(model, tmp_path / "now.safetensors")
    tensors, meta = vp.read_adapter(path)
    bns = [m for m, w in adapted_modules(model) if hasattr(w.adapters["task"], "stats")]
    assert len(bns) == 81 and all(tensors[f"{m}/stats"].shape[0] == 2 for m in bns)
    assert not any(k.endswith(("running_mean", "running_var")) for k in tensors)
    old = {k: v for k, v in tensors.items() if not k.endswith("/stats")}
    for m in bns:
        old[f"{m}/running_mean"], old[f"{m}/running_var"] = tensors[f"{m}/stats"].unbind(0)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "old.safetensors",
              metadata={"visionpeft": json.dumps(meta)})
    expected = run(vp.load_adapter(copy.deepcopy(plain), path), images)
    actual = run(vp.load_adapter(copy.deepcopy(plain), tmp_path / "old.safetensors"), images)
    assert max_rel_diff(actual, expected) == 0 and max_rel_diff(expected, run(model, images)) == 0
    assert os.path.getsize(path) < os.path.getsize(tmp_path / "old.safetensors") - 81 * 50


def test_save_is_atomic_and_creates_folders(base, tmp_path):
    _, model = trained(base, "yolov8-dora")
    path = vp.save_adapter(model, tmp_path / "runs" / "x" / "a.safetensors")
    first = path.read_bytes()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    vp.save_adapter(model, path)  # overwrite in place
    assert path.read_bytes() != first
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]  # no temporary files left


def test_several_adapters_from_files_switch_on_one_base(base, images, tmp_path):
    """Two tasks trained on the same base, loaded side by side and switched by name without reloading it."""
    plain = base("yolo11n.pt")
    coco = vp.inject(copy.deepcopy(plain), vp.LoraConfig(r=4), adapter_name="coco")
    crops = vp.inject(copy.deepcopy(plain), vp.DoraConfig(r=2), adapter_name="crops", names=["crop", "weed"])
    randomize_adapters(coco, seed=1)
    randomize_adapters(crops, seed=2)
    files = {n: vp.save_adapter(m, tmp_path / f"{n}.safetensors") for n, m in (("coco", coco), ("crops", crops))}
    expected = {"coco": run(coco, images), "crops": run(crops, images), None: run(plain, images)}

    model = copy.deepcopy(plain)
    base_tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    for path in files.values():
        vp.load_adapter(model, path)
    assert {k: v.data_ptr() for k, v in vp.base_state_dict(model).items()} == base_tensors  # same base tensors

    head = model.model[-1]
    for name, names in (("coco", plain.names), ("crops", {0: "crop", 1: "weed"}), (None, plain.names),
                        ("crops", {0: "crop", 1: "weed"}), ("coco", plain.names)):
        vp.set_adapter(model, name)
        out = run(model, images)
        # the plain base runs through FrozenBatchNorm2d: eval-mode BatchNorm up to float rounding
        assert max_rel_diff(out, expected[name]) <= (1e-5 if name is None else 0), name
        assert model.names == names and head.nc == len(names) and out[0].shape[1] == 4 + len(names)
    assert not torch.equal(expected["coco"][-1], expected[None][-1])  # the adapters do change the features


def test_read_adapter_returns_what_was_saved(base, tmp_path):
    _, model = trained(base, "vit-lora-new-classes")
    path = Path(vp.save_adapter(model, tmp_path / "vit.safetensors"))
    tensors, meta = vp.read_adapter(path)
    assert meta["family"] == "vit" and meta["targets"]["head"] == "trainable"
    assert tensors["head/module.weight"].shape == (3, 192)
