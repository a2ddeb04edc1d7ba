"""Files a user receives are data: adapters never make visionpeft load another file, crafted checkpoints and model
YAMLs never run code, and what visionpeft writes gets ordinary permissions and appears whole or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visionpeft as vp
from visionpeft.export import export, export_onnx
from visionpeft.export.cli import main as cli
from visionpeft.models import resolve_weights
from visionpeft.settings import datasets_dir

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 64
NAMES = ["crop", "weed"]
CHECKPOINTS = ["yolo11n.pt", "yolov8n.pt", "yolov5nu-coco-backbone.pt"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Cached base exports go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("VISIONPEFT_CACHE", str(tmp_path / "cache"))


class RunsCode:
    """Pickles as a call of ``func(*args)``: what a crafted checkpoint uses to run code when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch_payload(marker: Path) -> RunsCode:
    return RunsCode(os.system, f"touch '{marker}'")


def evil_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": touch_payload(marker)}, path)
    return path


def adapter_file(folder: Path, names=NAMES, base: str = "yolo11n.pt") -> Path:
    """An adapter on yolo11n.pt recording ``base`` as its base (the trainer records the path it trained from)."""
    model = vp.load_base("yolo11n.pt")
    vp.inject(model, vp.LoraConfig(r=2), adapter_name="a", names=names)
    return vp.save_adapter(model, folder / "a.safetensors", extra={"base": base})


def umask(mask: int):
    """Set the process umask for a block (restored on exit)."""
    class Umask:
        def __enter__(self):
            self.previous = os.umask(mask)

        def __exit__(self, *exc):
            os.umask(self.previous)

    return Umask()


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# -- 1. an adapter names its base; only the bare name is looked up, in the assets' weights -----------------------


def test_recorded_base_path_is_never_opened(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "elsewhere" / "base-from-the-adapter.pt", marker)
    adapter = adapter_file(tmp_path, base=str(evil))
    with pytest.raises(FileNotFoundError, match=r"base 'base-from-the-adapter.pt'.*pass base=.*\(--base\)"):
        export(adapter=adapter, imgsz=IMGSZ, verify=False)
    assert cli(["--adapter", str(adapter), "--imgsz", str(IMGSZ), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--base" in err and "base-from-the-adapter.pt" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_recorded_base_name_is_taken_from_the_assets(tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "elsewhere" / "yolo11n.pt", marker)  # same name as the real base
    adapter = adapter_file(tmp_path, base=str(evil))
    result = export(adapter=adapter, imgsz=IMGSZ, verify=False)
    assert result.metadata["base"] == str(resolve_weights("yolo11n.pt")) and result.file.is_file()
    assert not marker.exists()


def test_recorded_vit_detector_spec_takes_its_weights_from_the_assets(tmp_path):
    import dataclasses

    from visionpeft.export.pipeline import recorded_base
    from visionpeft.settings import weights_dir
    from visionpeft.vitdet.model import parse_spec

    spec = 'vitdet:{"backbone": "vit_tiny_patch16_224", "pretrained": "%s", "width": 32}'
    adapter = tmp_path / "a.safetensors"
    rebuilt = parse_spec(recorded_base({"base": spec % "/elsewhere/vit_tiny_patch16_224.safetensors"}, adapter))
    assert rebuilt.pretrained == str(weights_dir() / "vit_tiny_patch16_224.safetensors") and rebuilt.width == 32
    with pytest.raises(FileNotFoundError, match="'evil.pth', which is not in .*--base"):
        recorded_base({"base": spec % "/elsewhere/evil.pth"}, adapter)
    named_file = dataclasses.replace(parse_spec(spec % "x"), pretrained=True,
                                     timm_kwargs={"checkpoint_path": str(tmp_path / "evil.pth")})
    with pytest.raises(ValueError, match=r"timm options \['checkpoint_path'\] name files"):
        recorded_base({"base": named_file.source()}, adapter)


# -- 2. checkpoints: weights_only with an allow-list; Ultralytics' restricted model building ------------------------


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"not a plain Ultralytics checkpoint: it references `(posix|os)\.system`"):
        vp.load_base(evil)
    assert str(evil) in str(pytest.raises(ValueError, vp.load_base, evil).value)
    assert cli(["--base", str(evil), "--adapter", str(adapter_file(tmp_path)), "--no-verify"]) == 2
    assert not marker.exists()


def test_allowed_model_class_cannot_be_called_with_a_crafted_config(tmp_path):
    """``DetectionModel`` is on the allow-list, so the pickle may call it; its YAML ``activation`` would go
    through ``eval`` outside Ultralytics' restricted mode."""
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "pwned"
    cfg = {"nc": 1, "activation": f"__import__('os').system(\"touch '{marker}'\")",
           "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Conv", [16, 3, 2]]]}
    torch.save({"model": RunsCode(DetectionModel, cfg)}, tmp_path / "sneaky.pt")
    with pytest.raises(ValueError, match="not a plain Ultralytics checkpoint"):
        vp.load_base(tmp_path / "sneaky.pt")
    assert not marker.exists()


def test_model_yaml_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    yaml_file = tmp_path / "evil.yaml"
    yaml_file.write_text(f"nc: 2\nactivation: __import__('os').system(\"touch '{marker}'\")\n"
                         "backbone: [[-1, 1, Conv, [16, 3, 2]]]\nhead: [[-1, 1, Conv, [16, 3, 2]]]\n")
    with pytest.raises(ValueError, match="Model YAML .* is refused: .*unsupported activation"):
        vp.load_base(yaml_file)
    assert not marker.exists()


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_real_checkpoints_load_as_ultralytics_loads_them(name):
    from ultralytics.nn.tasks import load_checkpoint

    ours = vp.load_base(name)
    theirs, _ = load_checkpoint(str(resolve_weights(name)))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(ours) is type(theirs) and ours.names == theirs.names and ours.yaml == theirs.yaml
    assert ours.args == theirs.args and ours.task == theirs.task == "detect" and ours.pt_path == theirs.pt_path
    assert torch.equal(ours.stride, theirs.stride) and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())


# -- 4. file modes ----------------------------------------------------------------------------------------------------


def test_written_files_get_the_umask_mode_and_keep_an_existing_one(tmp_path):
    with umask(0o022):
        adapter = adapter_file(tmp_path / "a")
        assert mode(adapter) == 0o644
        result = export(base="yolo11n.pt", adapter=adapter, imgsz=IMGSZ, runs=0, out=tmp_path / "out")
        assert mode(result.file) == 0o644 and mode(result.report_file) == 0o644
    with umask(0o027):
        assert mode(adapter_file(tmp_path / "b")) == 0o640
        os.chmod(adapter, 0o600)  # a file the user restricted keeps its mode when replaced
        assert mode(adapter_file(tmp_path / "a")) == 0o600


def test_export_onnx_file_mode(tmp_path):
    with umask(0o022):
        path = export_onnx(vp.load_base("yolo11n.pt"), tmp_path / "plain.onnx", imgsz=IMGSZ)
    assert mode(path) == 0o644


# -- 5. class names ---------------------------------------------------------------------------------------------------


def test_dataset_with_other_class_names_is_refused(tmp_path, capsys):
    coco8 = datasets_dir() / "coco8" / "data.yaml"
    adapter = adapter_file(tmp_path)
    with pytest.raises(ValueError, match=r"\['crop', 'weed'\] differ from .*\['person', 'bicycle'.*80 classes"):
        export(adapter=adapter, data=coco8, imgsz=IMGSZ, verify=False)
    assert cli(["--adapter", str(adapter), "--data", str(coco8), "--no-verify", "--imgsz", str(IMGSZ)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-names-mismatch" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.onnx"))
    assert cli(["--adapter", str(adapter), "--data", str(coco8), "--no-verify", "--imgsz", str(IMGSZ),
                "--allow-names-mismatch"]) == 0


def test_check_class_names_accepts_lists_dicts_and_dataset_names():
    from visionpeft.datasets import check_class_names

    check_class_names(["crop", "weed"], "crop_weed")
    check_class_names({0: "crop", 1: "weed"}, "crop_weed")
    with pytest.raises(ValueError, match=r"\['weed', 'crop'\] differ .* \['crop', 'weed'\] \(first difference at "
                                         r"class 0\)"):
        check_class_names(["weed", "crop"], "crop_weed")


# -- 6. a .pt passed as the adapter -------------------------------------------------------------------------------


def test_pytorch_checkpoint_passed_as_adapter(tmp_path, capsys):
    weights = resolve_weights("yolo11n.pt")
    with pytest.raises(vp.AdapterFileError, match=r"is a PyTorch checkpoint .*--base.*--run"):
        vp.io.read_adapter(weights)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(vp.AdapterFileError, match="is a PyTorch checkpoint"):
        vp.io.read_adapter(legacy)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_file(tmp_path).read_bytes()[:100])
    with pytest.raises(vp.AdapterFileError, match="corrupt or truncated"):
        vp.io.read_adapter(truncated)
    assert cli(["--adapter", str(weights), "--base", "yolo11n.pt"]) == 2
    assert "PyTorch checkpoint" in capsys.readouterr().err


# -- 7. a failed INT8 export leaves the output folder as it was ------------------------------------------------------


def unreadable_dataset(root: Path) -> Path:
    """A dataset whose images are not images: INT8 calibration fails after the FP32 file was exported."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            (root / "images" / split / f"{i}.jpg").write_bytes(b"not a jpeg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    yaml_file = root / "data.yaml"
    yaml_file.write_text("train: images/train\nval: images/val\nnames: {0: crop, 1: weed}\n")
    return yaml_file


def test_failed_int8_export_leaves_no_files(tmp_path):
    adapter = adapter_file(tmp_path)
    data = unreadable_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file\n")
    with pytest.raises(ValueError, match="Cannot read image"):
        export(adapter=adapter, quantize=8, data=data, imgsz=IMGSZ, calib=2, verify=False, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="Cannot read image"):
        export(adapter=adapter, quantize=8, data=data, imgsz=IMGSZ, calib=2, verify=False, out=tmp_path / "new")
    assert not (tmp_path / "new").exists()


# -- 3. no network, onnxruntime telemetry off before every session ----------------------------------------------------

TELEMETRY = """
import onnxruntime as _ort
_seen = {"off": False, "sessions": 0, "before_off": 0}
_disable, _init = _ort.disable_telemetry_events, _ort.InferenceSession.__init__
def _disable_telemetry():
    _seen["off"] = True
    _disable()
def _session(self, *args, **kwargs):
    _seen["sessions"] += 1
    _seen["before_off"] += not _seen["off"]
    _init(self, *args, **kwargs)
_ort.disable_telemetry_events, _ort.InferenceSession.__init__ = _disable_telemetry, _session
import atexit
atexit.register(lambda: print("SESSIONS=" + json.dumps(_seen)))
"""


def test_cli_exports_int8_and_validates_offline_with_telemetry_off(tmp_path):
    """``scripts/export.py --quantize 8 --val`` end to end, every non-loopback connection or DNS lookup recorded
    and refused (the training test's guard), every onnxruntime session counted."""
    from test_train import GUARD

    guard = tmp_path / "guard.py"
    guard.write_text("import json\n" + TELEMETRY + GUARD)
    adapter = adapter_file(tmp_path, names=None)  # the 80 COCO classes of coco8
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics_config"),
           "VISIONPEFT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(guard), str(ROOT / "scripts" / "export.py"), "--adapter", str(adapter),
           "--data", "coco8", "--quantize", "8", "--val", "--imgsz", str(IMGSZ), "--calib", "2", "--runs", "1",
           "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.rsplit("ATTEMPTS=", 1)[1].splitlines()[0]) == []
    sessions = json.loads(out.stdout.rsplit("SESSIONS=", 1)[1].splitlines()[0])
    assert sessions["off"] and sessions["sessions"] >= 4 and sessions["before_off"] == 0
    report = json.loads((tmp_path / "out" / "a_int8.verify.json").read_text())
    assert {"fp32", "int8"} <= set(report["exports"]) and "map50_95" in report["exports"]["int8"]
