"""Several tasks on one device (issue 16 part 2): one base ONNX in memory, patches switched in onnxruntime.

Real yolo11n exports at 64 px, adapters with random non-zero factors (fp16 files, as the trainer saves them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_edge_patch import BLOCKER, IMGSZ, NAMES, make_adapter

import visionpeft as vp
from visionpeft.edge import Fleet, PatchError, apply_patch
from visionpeft.edge.fleet import IN_MEMORY
from visionpeft.export.images import letterbox, sample_images
from visionpeft.export.patch import export_patch
from visionpeft.export.verify import onnx_outputs
from visionpeft.settings import datasets_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Two patches for one base (LoRA with 2 new classes; DoRA on layers 16-23 keeping the 80, from a 4-bit file, so
    its factors travel as 4-bit blocks), merged models."""
    out = {}
    cases = (("weeds", vp.LoraConfig(r=4), NAMES, None), ("coco", vp.DoraConfig(r=8, layers="16-23"), None, 4))
    for name, configs, names, bits in cases:
        folder = tmp_path_factory.mktemp(name)
        adapter = make_adapter(folder, configs, names, name=name, bits=bits)
        result = export_patch(adapter=adapter, imgsz=IMGSZ, out=folder)
        merged = folder / f"{name}.onnx"
        apply_patch(result.base_file, result.file, merged)
        out[name] = {"patch": result.file, "base": result.base_file, "merged": merged}
    return out


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    data = datasets_dir() / "crop_weed" / "data.yaml"
    if not data.is_file():
        pytest.skip(f"crop_weed dataset not found at {data}")
    return [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(data, "val", 3)]


def test_switching_gives_each_merged_model_and_reads_no_file(made, images, tmp_path):
    base = tmp_path / "base.onnx"
    shutil.copy(made["weeds"]["base"], base)
    patches = {n: shutil.copy(m["patch"], tmp_path / f"{n}.vpatch") for n, m in made.items()}
    fleet = Fleet(base, threads=1)
    assert [fleet.add(p) for p in patches.values()] == ["weeds", "coco"]  # names from the patches' metadata
    for p in (base, *patches.values()):
        Path(p).unlink()  # a switch must not need any file: everything is in memory
    want = {n: onnx_outputs(m["merged"], images) for n, m in made.items()}
    for name in ("weeds", "coco", "weeds", "coco"):
        got = [fleet.run(x, adapter=name)[0] for x in images]
        for w, g in zip(want[name], got, strict=True):
            assert np.abs(w - g).max() <= 1e-5 * np.abs(w).max()
        assert fleet.active == name
    assert got[0].shape[1] == 4 + 80 and [fleet.run(images[0], "weeds")[0].shape[1]] == [4 + len(NAMES)]
    assert fleet.names("weeds") == {0: "crop", 1: "weed"} and len(fleet.names("coco")) == 80
    assert len(fleet._sessions) == 1  # keep=1: one model's weights live, however many adapters are held


def test_large_tensors_are_handed_over_in_memory_and_base_tensors_shared(made):
    fleet = Fleet(made["weeds"]["base"], keep=2)
    for m in made.values():
        fleet.add(m["patch"])
    graph = onnx.load_from_string(fleet._held["weeds"].graph)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.external_data[0].value == IN_MEMORY for t in external)
    assert sum(t.ByteSize() for t in graph.graph.initializer) < 0.05 * Path(made["weeds"]["merged"]).stat().st_size
    fleet.add(made["coco"]["patch"], name="coco2")  # layers 0-15 unchanged: their weights come from the base
    fleet.use("coco")
    fleet.use("coco2")
    assert len(fleet._sessions) == 2 and fleet._shared  # both sessions read the base's unchanged tensors from one copy
    shared = {id(v) for v in fleet._sessions["coco"][1][0]} & {id(v) for v in fleet._sessions["coco2"][1][0]}
    assert shared and shared == {id(v) for v in fleet._shared.values()}
    fleet.use("weeds")  # keep=2: the least recently used session goes
    assert list(fleet._sessions) == ["coco2", "weeds"]


def test_wrong_input_fails_in_one_line_at_add(made, tmp_path):
    base = onnx.load(str(made["weeds"]["base"]))
    w = base.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.001, w.name))  # a retrained base
    fleet = Fleet(base)
    with pytest.raises(PatchError, match="weights differ"):
        fleet.add(made["weeds"]["patch"])
    fleet = Fleet(made["weeds"]["base"])
    fleet.add(made["weeds"]["patch"])
    with pytest.raises(PatchError, match="already held"):
        fleet.add(made["weeds"]["patch"])
    with pytest.raises(PatchError, match="No adapter is active"):
        fleet.run(np.zeros((1, 3, IMGSZ, IMGSZ), np.float32))
    with pytest.raises(PatchError, match=r"No adapter named 'crops'.*\['weeds'\]"):
        fleet.use("crops")
    with pytest.raises(PatchError, match="not a visionpeft patch"):
        fleet.add(made["weeds"]["base"])
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Fleet(made["weeds"]["base"], keep=0)


def test_switch_command_runs_where_torch_cannot_be_imported(made, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    blocker = textwrap.dedent(BLOCKER).replace('"onnxruntime", ', "")  # a device with numpy, onnx and onnxruntime
    (site / "sitecustomize.py").write_text(blocker)
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "blocked by the test" in check.stderr
    run = subprocess.run([sys.executable, "-m", "visionpeft.edge", "switch", str(made["weeds"]["base"]),
                          str(made["weeds"]["patch"]), str(made["coco"]["patch"]), "--rounds", "2"],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "weeds: switch" in run.stdout and "classes ['crop', 'weed']" in run.stdout and "MiB RSS" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "visionpeft.edge", "switch", str(made["weeds"]["base"]),
                          str(tmp_path / "missing.vpatch")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.vpatch" in bad.stderr
