"""Patches (issue 16 part 1): a device turns its base ONNX into the adapter's merged ONNX with numpy and onnx only.

Real yolo11n exports at 64 px (the crops recipe at 320 px for size and time), real crop_weed images, adapters with
random non-zero factors saved in float16 as the trainer does.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_adapters
from onnx import numpy_helper

import visionpeft as vp
from visionpeft import blockquant
from visionpeft.edge import PatchError, apply_patch, read_recipe
from visionpeft.edge.apply import BLOCK, _factor, unblock
from visionpeft.edge.apply import main as edge_main
from visionpeft.export import export
from visionpeft.export.cli import main as export_cli
from visionpeft.export.images import letterbox, sample_images
from visionpeft.export.patch import as_blocks, export_patch
from visionpeft.export.verify import onnx_outputs
from visionpeft.io import read_adapter
from visionpeft.models import resolve_weights

IMGSZ = 64
NAMES = ["crop", "weed"]
ROOT = Path(__file__).resolve().parent.parent
# name: (method configs, class names, quantize)
CASES = {
    "lora_new_classes_bn": ([vp.LoraConfig(r=4), vp.NormStatsConfig()], NAMES, 32),  # BatchNorm moves: s' != s
    "dora_same_classes": ([vp.DoraConfig(r=8), vp.ShiftConfig()], None, 32),  # DoRA on the 80 class outputs too;
    # shift: BatchNorm biases move
    "dora_new_classes_fp16": (vp.DoraConfig(r=8), NAMES, 16),
    "dora_pissa_new_classes": (vp.DoraConfig(r=4, init="pissa"), NAMES, 32),  # rank-2r factors [B, -B0] [A; A0]
    "loha_dora_new_classes": (vp.LohaConfig(r=2, use_dora=True), NAMES, 32),  # convs stored whole
    "bottleneck_lora": ([vp.BottleneckConfig(), vp.LoraConfig(r=4)], NAMES, 32),  # extra nodes, wrapped convs
}


def make_adapter(folder: Path, configs, names, name: str = "crops", bits: int | None = None) -> Path:
    model = vp.load_base("yolo11n.pt")
    torch.manual_seed(0)  # LoRA A's initialisation
    vp.inject(model, configs, adapter_name=name, names=names)
    randomize_adapters(model)
    with torch.no_grad():  # per-adapter BatchNorm statistics off the base's, so the fold scale changes
        for n, b in model.named_buffers():
            if ".adapters." in n and n.endswith(".stats"):  # norm_stats: (running_mean, running_var)
                b[1].mul_(1.5)
    model.visionpeft["base"] = str(resolve_weights("yolo11n.pt"))  # as the trainer records it
    return vp.save_adapter(model, folder / f"{name}.safetensors", dtype=torch.float16, bits=bits)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Per case: the adapter, its patch (the first one through the CLI), the patched and the direct export."""
    out = {}
    for case, (configs, names, quantize) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        adapter = make_adapter(folder, configs, names)
        if not out:
            assert export_cli(["--patch", "--adapter", str(adapter), "--imgsz", str(IMGSZ), "--out",
                               str(folder / "cli.vpatch")]) == 0
        result = export_patch(adapter=adapter, imgsz=IMGSZ, quantize=quantize, out=folder)
        direct = export(adapter=adapter, imgsz=IMGSZ, quantize=quantize, out=folder / "direct", verify=False)
        patched = folder / "patched.onnx"
        apply_patch(result.base_file, result.file, patched)
        out[case] = {"adapter": adapter, "result": result, "patched": patched, "direct": direct,
                     "cli": folder / "cli.vpatch"}
    return out


def rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))
    return max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(a, b, strict=True))


def props(path: Path) -> dict[str, str]:
    """ONNX metadata but the export time (the patched and the direct file come from two exports)."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props if p.key != "date"}


@pytest.mark.parametrize("case", list(CASES))
def test_patched_model_is_the_direct_export(made, data, case):
    m = made[case]
    result, direct = m["result"], m["direct"]
    precision = result.precision
    images = [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(data, "val", 4)]
    want, got = onnx_outputs(direct.files[precision], images), onnx_outputs(m["patched"], images)
    if precision == "fp32":  # PiSSA: a principal start the size of W cancels, float32 rounding of W, not of s B A
        assert rel_diff(want, got) <= (1e-4 if "pissa" in case else 1e-5)
    else:  # a float16 base has lost the float32 weights the direct export rounds once: float16 rounding, not 1e-5
        fp32 = onnx_outputs(direct.files["fp32"], images)
        assert rel_diff(want, got) <= 2 * rel_diff(fp32, want)  # within float16's own error
        assert rel_diff(fp32, got) <= 2 * rel_diff(fp32, want)  # as close to the float32 model as the direct file
    # the adapter moves the boxes far beyond those tolerances (a dropped update would be caught)
    plain = onnx_outputs(result.base_file, images)
    assert rel_diff([p[:, :4] for p in plain], [g[:, :4] for g in got]) > 5e-2
    assert got[0].shape[1] == 4 + len(CASES[case][1] or plain[0][0, 4:])
    assert props(m["patched"]) == props(direct.files[precision])  # names, imgsz, visionpeft: all of it
    if "loha" in case:  # no factor form on the device: its convs travel whole, still less than the whole model
        assert result.size < result.merged_size
    else:
        assert result.size <= (0.1 if precision == "fp32" else 0.2) * result.merged_size

    from ultralytics import YOLO

    yolo = YOLO(str(m["patched"]), task="detect")
    names = CASES[case][1]
    assert list(yolo.names.values()) == (names or list(vp.load_base("yolo11n.pt").names.values()))
    assert len(yolo.predict(sample_images(data, "val", 1)[0], imgsz=IMGSZ, verbose=False)[0].boxes.cls) >= 0


@pytest.mark.parametrize("case", [c for c in CASES if "loha" not in c])  # LoHa's convs travel whole
def test_every_adapted_conv_is_rebuilt_from_its_factors_incl_depthwise(made, case):
    m = made[case]
    patch = onnx.load(str(m["result"].file))
    recipe = read_recipe(patch)
    _, meta = read_adapter(m["adapter"])
    method = "dora" if case.startswith("dora") else "lora"
    adapted = sorted(f"{t}.weight" for t, kind in meta["targets"].items() if kind == method)
    rebuilt = [e for e in recipe["initializers"] if e["kind"] == method]
    assert sorted(e["base"] for e in rebuilt) == adapted and adapted
    stored = {t.name: t for t in patch.graph.initializer}
    groups = {e["name"]: stored[e["A"]].dims[0] for e in rebuilt}
    weights = {t.name: t for t in onnx.load(str(m["direct"].files[m["result"].precision])).graph.initializer}
    depthwise = [n for n, g in groups.items() if g > 1 and g == weights[n].dims[0]]
    assert depthwise and any(g == 1 for g in groups.values())
    assert all(stored[e["A"]].data_type == onnx.TensorProto.FLOAT16 for e in rebuilt)  # fp16 adapter: lossless
    assert ("ratio" in rebuilt[0]) == case.endswith("_bn")
    assert m["result"].max_rel <= (1e-5 if m["result"].precision == "fp32" else 2e-3)


def test_cli_patch_matches_api_patch(made):
    first = next(iter(made.values()))
    assert read_recipe(onnx.load(str(first["cli"])))["base"] == read_recipe(onnx.load(str(first["result"].file)))[
        "base"]
    a = apply_patch(first["result"].base_file, first["cli"])
    b = onnx.load(str(first["patched"]))
    assert [numpy_helper.to_array(t).tobytes() for t in a.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in b.graph.initializer]


BLOCKER = """
import sys

BLOCKED = {"torch", "torchvision", "ultralytics", "timm", "onnxruntime", "onnxslim", "safetensors", "cv2", "yaml"}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}' (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""


def test_applier_runs_where_torch_cannot_be_imported(made, tmp_path):
    m = made["dora_new_classes_fp16"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked by the test" in check.stderr

    out = tmp_path / "module.onnx"
    run = subprocess.run([sys.executable, "-m", "visionpeft.edge", "apply", str(m["result"].base_file),
                          str(m["result"].file), "-o", str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    standalone = tmp_path / "visionpeft_edge.py"  # the one file a device can carry instead of the package
    shutil.copy(ROOT / "visionpeft" / "edge" / "apply.py", standalone)
    out2 = tmp_path / "standalone.onnx"
    run = subprocess.run([sys.executable, str(standalone), "apply", str(m["result"].base_file), str(m["result"].file),
                          "-o", str(out2)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == out2.read_bytes() == m["patched"].read_bytes()
    run = subprocess.run([sys.executable, "-c", "import visionpeft; visionpeft.inject"], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "python -m visionpeft.edge" in run.stderr.strip().splitlines()[-1]


def _cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = edge_main(list(args))
    return code, err.getvalue()


def test_wrong_base_is_refused_in_one_line_and_nothing_is_lost(made, tmp_path):
    lora, fp16 = made["lora_new_classes_bn"]["result"], made["dora_new_classes_fp16"]["result"]
    out = tmp_path / "existing.onnx"
    out.write_bytes(b"keep me")

    code, err = _cli("apply", str(fp16.base_file), str(lora.file), "-o", str(out))  # fp16 base, fp32 patch
    assert code == 2 and err.count("\n") == 1 and "float16" in err and "float32" in err
    assert out.read_bytes() == b"keep me"

    base = onnx.load(str(lora.base_file))
    w = base.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.001, w.name))  # retrained base
    changed = tmp_path / "changed.onnx"
    onnx.save(base, str(changed))
    code, err = _cli("apply", str(changed), str(lora.file), "-o", str(out))
    assert code == 2 and err.count("\n") == 1 and "weights differ" in err and "yolo11n.pt" in err
    del base.graph.initializer[0]
    with pytest.raises(PatchError, match="lacks tensor"):
        apply_patch(base, lora.file)
    assert out.read_bytes() == b"keep me"

    code, err = _cli("apply", str(lora.base_file), str(lora.file), "-o", str(lora.base_file))
    assert code == 2 and "would be lost" in err
    code, err = _cli("apply", str(lora.base_file), str(lora.base_file), "-o", str(out))  # a model, not a patch
    assert code == 2 and err.count("\n") == 1 and "not a visionpeft patch" in err
    garbage = tmp_path / "garbage.vpatch"
    garbage.write_bytes(os.urandom(4096))
    code, err = _cli("apply", str(lora.base_file), str(garbage), "-o", str(out))
    assert code == 2 and err.count("\n") == 1 and "garbage.vpatch" in err
    assert out.read_bytes() == b"keep me"


def test_patch_never_opens_files_it_names(made, tmp_path):
    """A patch is data: a tensor pointing at an external file is refused, the file never read."""
    lora = made["lora_new_classes_bn"]["result"]
    patch = onnx.load(str(lora.file))
    t = patch.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=str(tmp_path / "secret.bin"))
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    crafted = tmp_path / "crafted.vpatch"
    crafted.write_bytes(patch.SerializeToString())
    with pytest.raises(PatchError, match="external files"):
        apply_patch(lora.base_file, crafted)


def test_patch_for_the_devices_own_base_file(made, tmp_path, capsys):
    m = made["lora_new_classes_bn"]
    deployed = tmp_path / "deployed.onnx"
    shutil.copy(m["result"].base_file, deployed)
    result = export_patch(adapter=m["adapter"], base_onnx=deployed, out=tmp_path / "own.vpatch")  # imgsz: the base's
    assert result.base_file == deployed and result.file == tmp_path / "own.vpatch"
    mine, theirs = apply_patch(deployed, result.file), onnx.load(str(m["patched"]))
    assert [numpy_helper.to_array(t).tobytes() for t in mine.graph.initializer] == \
        [numpy_helper.to_array(t).tobytes() for t in theirs.graph.initializer]
    assert {p.key: p.value for p in mine.metadata_props}["imgsz"] == f"[{IMGSZ}, {IMGSZ}]"
    with pytest.raises(ValueError, match="holds float32 weights, a fp16 patch.*--quantize 32"):
        export_patch(adapter=m["adapter"], base_onnx=deployed, quantize=16)

    assert edge_main(["info", str(result.file)]) == 0
    info = capsys.readouterr().out
    assert "'crop', 1: 'weed'" in info and "fp32 ONNX export of 'yolo11n.pt'" in info and "84 lora" in info


def test_int8_is_refused_with_the_reason(made):
    adapter = made["lora_new_classes_bn"]["adapter"]
    with pytest.raises(ValueError, match="INT8 file keeps 8-bit codes"):
        export_patch(adapter=adapter, imgsz=IMGSZ, quantize=8)


def test_crops_recipe_patch_is_small_and_applies_within_a_second(tmp_path, capsys):
    """configs/crops.yaml's adapter (DoRA r8 on every conv, 2 new classes, 4-bit factors) at its 320 px: the bar of
    issue 16. The patch carries the file's 4-bit blocks as they are (format v2), so it is smaller than the patch of
    the same adapter saved in float16, and still rebuilds the direct export to float32 rounding."""
    adapter = make_adapter(tmp_path, vp.DoraConfig(r=8, alpha=16), NAMES, bits=4)
    assert read_adapter(adapter)[1]["rounded"]["bits"] == 4
    result = export_patch(adapter=adapter, imgsz=320, out=tmp_path)
    assert result.size <= 0.10 * result.merged_size and result.max_rel <= 1e-5
    patch = onnx.load(str(result.file))
    recipe = read_recipe(patch)
    assert recipe["format"] == "visionpeft.patch.v2"
    factors = [t for t in patch.graph.initializer if t.name.endswith(("/A", "/B"))]
    assert factors and all(t.data_type == onnx.TensorProto.UINT8 for t in factors)  # two 4-bit values a byte
    dora = [e for e in recipe["initializers"] if e["kind"] == "dora"]
    assert dora and all(e["blocks"]["A"]["bits"] == e["blocks"]["B"]["bits"] == 4 for e in dora)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        apply_patch(result.base_file, result.file, tmp_path / "crops.onnx")
        times.append(time.perf_counter() - start)
    assert min(times) <= 1.0

    fp16 = make_adapter(tmp_path / "fp16", vp.DoraConfig(r=8, alpha=16), NAMES)  # the same adapter, float16
    plain = export_patch(adapter=fp16, imgsz=320, out=tmp_path / "fp16")
    assert read_recipe(onnx.load(str(plain.file)))["format"] == "visionpeft.patch.v1"  # old appliers read it
    assert result.size <= 0.6 * plain.size
    with capsys.disabled():
        print(f"\ncrops recipe, 320 px: {result}; apply {min(times):.2f} s (best of 3); float16 file's patch "
              f"{plain.size / 1e6:.3f} MB")


@pytest.mark.parametrize("bits", [4, 8])
def test_device_restores_rounded_factors_exactly_and_refuses_corrupt_ones(bits):
    """The applier's numpy ``unblock`` (no torch on a device) gives the adapter file's floats bit for bit, for any
    size (a partial last block); damaged data or scales are a one-line PatchError, not a wrong model."""
    assert BLOCK == blockquant.BLOCK
    torch.manual_seed(0)
    for shape in [(3, 8, 27), (1, 64, 8), (5,)]:
        t = torch.randn(shape) * 0.02
        data, scales = blockquant.quantize(t, bits)
        want = blockquant.dequantize(data, scales, bits, shape)
        got = unblock(data.numpy(), scales.numpy(), bits, list(shape))
        assert np.array_equal(got, want.numpy())
        again = as_blocks(got)  # the patch writer finds a 4-bit file's blocks again; 8-bit ones travel as float16
        if bits == 4:
            assert again is not None and np.array_equal(unblock(*again, list(shape)), got)
        else:  # finer values than 4-bit blocks hold: never claimed as such
            assert again is None
    assert as_blocks(np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)) is None  # unrounded: kept

    entry = {"name": "model.0.conv.weight", "A": "f/A", "blocks": {"A": {"bits": bits, "shape": [3, 8, 27],
                                                                          "scales": "f/A/scales"}}}
    stored = {"f/A": data.numpy(), "f/A/scales": scales.numpy()}
    bad = [{**stored, "f/A/scales": stored["f/A/scales"][:-1]},
           {**stored, "f/A/scales": np.full_like(stored["f/A/scales"], np.inf)},
           {**stored, "f/A": stored["f/A"].astype(np.float32)}]
    for broken in bad:
        with pytest.raises(PatchError, match="corrupt") as e:
            _factor(broken, entry, "A")
        assert "\n" not in str(e.value)
    with pytest.raises(PatchError, match="misses tensor 'f/A/scales'"):
        _factor({"f/A": stored["f/A"]}, entry, "A")
