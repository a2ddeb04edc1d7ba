"""Export: adapters merged into yolo11n, to ONNX (FP32/FP16/INT8) through Ultralytics, verified against PyTorch."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import visionpeft as vp
from visionpeft.export import ExportOptions, export, export_onnx, float_nodes, read_metadata
from visionpeft.export.cli import main as cli
from visionpeft.export.images import letterbox, sample_images
from visionpeft.export.verify import onnx_outputs, torch_outputs
from visionpeft.models import resolve_weights
from visionpeft.settings import datasets_dir

IMGSZ = 64
NAMES = ["crop", "weed"]


@pytest.fixture(scope="module")
def coco8():
    path = datasets_dir() / "coco8" / "data.yaml"
    if not path.is_file():
        pytest.skip(f"coco8 dataset not found at {path}")
    return path


def randomise(model: torch.nn.Module, std: float = 0.02) -> None:
    """Non-zero adapters (LoRA B and bottleneck up start at zero), so a dropped adapter changes the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def make_adapter(folder, configs, name: str, names=NAMES, base: str = "yolo11n.pt"):
    model = vp.load_base(base)
    vp.inject(model, configs, adapter_name=name, names=names)
    randomise(model)
    model.visionpeft["base"] = str(resolve_weights(base))  # as the trainer records it
    return vp.save_adapter(model, folder / f"{name}.safetensors"), model


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    adapter, model = make_adapter(folder, vp.LoraConfig(r=4), "weeds")
    return export(adapter=adapter, imgsz=IMGSZ, runs=3), model


def test_lora_export_matches_unmerged_model_and_adds_no_nodes(lora_export):
    result, model = lora_export
    report = json.loads(result.report_file.read_text())
    fp32 = report["exports"]["fp32"]
    assert result.ok and report["ok"]
    assert fp32["parity"]["max_rel"] <= 1e-4
    assert fp32["extra_nodes"] == 0 and fp32["nodes"] == report["base"]["nodes"]
    assert fp32["initializers"] == report["base"]["initializers"]
    assert fp32["latency_ms"] > 0 and report["base"]["latency_ms"] > 0
    assert result.file.name == "weeds.onnx" and result.report_file.name == "weeds.verify.json"
    # the typed report writes the keys, in the order, report files have always had
    assert report == json.loads(json.dumps(result.report.to_dict()))
    assert list(report) == ["adapter", "methods", "mergeable", "base", "adapter_file", "imgsz", "images", "threads",
                            "runs", "exports", "checks", "ok"]
    assert list(fp32) == ["file", "size_mb", "nodes", "initializers", "parity", "extra_nodes", "latency_ms",
                          "size_vs_fp32", "latency_vs_fp32", "latency_vs_base"]
    assert report["checks"]["parity_fp32"] == {"ok": True, "value": fp32["parity"]["max_rel"], "limit": 1e-4}
    assert "PASS parity_fp32" in str(result) and "fp32: weeds.onnx" in str(result)

    # the parity check can fail: the adapter moves the outputs far more than the tolerance
    batches = [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(None)]
    plain = torch_outputs(vp.load_base("yolo11n.pt"), batches)
    adapted = torch_outputs(model, batches)
    box_shift = max(np.abs(a[:, :4] - b[:, :4]).max() for a, b in zip(plain, adapted, strict=True))
    assert box_shift > 1e3 * fp32["parity"]["box_max_abs"] + 1e-3


def test_export_carries_ultralytics_and_visionpeft_metadata(lora_export):
    result, _ = lora_export
    meta = read_metadata(result.file)
    assert {"names", "stride", "imgsz", "task", "batch"} <= set(meta)
    assert meta["names"] == str(dict(enumerate(NAMES))) and meta["imgsz"] == str([IMGSZ, IMGSZ])
    ours = json.loads(meta["visionpeft"])
    assert ours["adapter"] == "weeds" and ours["methods"] == ["lora", "trainable"] and ours["mergeable"]
    assert ours["base_fingerprint"] == vp.fingerprint(vp.load_base("yolo11n.pt"))
    assert ours["precision"] == "fp32" and len(ours["adapter_sha256"]) == 64


def test_ultralytics_predicts_with_the_export(lora_export):
    from ultralytics import YOLO

    result, _ = lora_export
    predictions = YOLO(str(result.file), task="detect").predict(sample_images(None)[0], imgsz=IMGSZ, conf=0.0,
                                                                 verbose=False)
    assert predictions[0].names == dict(enumerate(NAMES))
    assert len(predictions[0].boxes) > 0 and predictions[0].boxes.cls.max() < len(NAMES)


def test_dora_merges_without_extra_nodes(tmp_path):
    adapter, _ = make_adapter(tmp_path, vp.DoraConfig(r=4), "dora")
    result = export(adapter=adapter, imgsz=IMGSZ, runs=0)
    fp32 = result.report.exports["fp32"]
    assert result.ok and fp32.extra_nodes == 0 and fp32.parity.max_rel <= 1e-4
    assert fp32.latency_ms is None and "latency_ms" not in fp32.to_dict()  # runs=0 skips timing


def test_bottleneck_exports_with_its_extra_nodes(tmp_path):
    adapter, _ = make_adapter(tmp_path, vp.BottleneckConfig(r=8), "bn")
    result = export(adapter=adapter, imgsz=IMGSZ, runs=2)
    fp32 = result.report.exports["fp32"]
    assert result.ok and not result.report.mergeable
    assert fp32.extra_nodes > 0 and "no_extra_nodes" not in result.report.checks
    assert fp32.parity.max_rel <= 1e-4
    assert f"(+{fp32.extra_nodes})" in str(result)


def test_fp16_export_loads_in_onnxruntime(tmp_path, lora_export):
    _, model = lora_export
    vp.save_adapter(model, tmp_path / "w.safetensors", extra={"base": "yolo11n.pt"})
    result = export(adapter=tmp_path / "w.safetensors", quantize=16, imgsz=IMGSZ, runs=0)
    assert set(result.files) == {"fp32", "fp16"} and result.file.name == "w_fp16.onnx"
    weights = onnx.load(str(result.file)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    session = ort.InferenceSession(str(result.file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"  # callers keep feeding float32
    assert result.report.exports["fp16"].parity.score_max_abs < 0.05
    assert json.loads(read_metadata(result.file)["visionpeft"])["precision"] == "fp16"


def test_int8_keeps_the_decode_in_float(tmp_path, lora_export, coco8):
    _, model = lora_export
    vp.save_adapter(model, tmp_path / "w.safetensors", extra={"base": "yolo11n.pt"})
    # coco8 images calibrate a crop/weed adapter here: its class names differ, as the check would say
    result = export(adapter=tmp_path / "w.safetensors", quantize=8, imgsz=IMGSZ, data=coco8, runs=0,
                    check_names=False)
    assert set(result.files) == {"fp32", "int8"} and result.file.name == "w_int8.onnx"
    ort.InferenceSession(str(result.file), providers=["CPUExecutionProvider"])
    fp32, int8 = onnx.load(str(result.files["fp32"])), onnx.load(str(result.file))
    kept = set(float_nodes(fp32))
    ops = {n.name: n.op_type for n in fp32.graph.node}
    assert {"Softmax", "Sigmoid", "Concat"} <= {ops[n] for n in kept}  # DFL, class scores, output concat
    assert any(n.op_type == "Conv" and "dfl" in n.name for n in fp32.graph.node if n.name in kept)
    logits = [n.name for n in fp32.graph.node if re.fullmatch(r"/model\.23/cv[23]\.\d/cv[23]\.\d\.2/Conv", n.name)]
    assert len(logits) == 6 and set(logits) <= kept  # box and class output convs: float
    weights = {n.name: n.input[1] for n in int8.graph.node if n.op_type == "Conv"}
    dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    assert all(weights[n] not in dequantized for n in logits)
    assert sum(weights[n] in dequantized for n in weights) > 50  # the other convs: int8 weights
    producers = {o: n for n in int8.graph.node for o in n.output}
    output = producers[int8.graph.output[0].name]
    assert output.op_type == "Concat" and all(producers[i].op_type != "DequantizeLinear" for i in output.input)
    assert sum(n.op_type == "QuantizeLinear" for n in int8.graph.node) > 50  # the backbone is quantized
    assert result.report.exports["int8"].size_mb < 0.4 * result.report.exports["fp32"].size_mb
    # class scores survive: one INT8 scale shared with box pixels would round them all to zero
    batches = [letterbox(p, (IMGSZ, IMGSZ)) for p in result.report.images]
    ref, out = np.concatenate(torch_outputs(model, batches)), np.concatenate(onnx_outputs(result.file, batches))
    assert np.abs(ref[:, 4:] - out[:, 4:]).max() < 0.3 and out[:, 4:].max() > 0.5 * ref[:, 4:].max()


def test_val_reports_onnx_and_pytorch_map(tmp_path, coco8):
    adapter, _ = make_adapter(tmp_path, vp.LoraConfig(r=4), "coco", names=None)
    result = export(adapter=adapter, imgsz=128, data=coco8, val=True, runs=0)
    onnx_map, torch_map = result.report.exports["fp32"].map50_95, result.report.pytorch.map50_95
    assert torch_map > 0 and abs(onnx_map - torch_map) < 0.01


def test_run_folder_and_cli(tmp_path, coco8):
    run = tmp_path / "runs" / "detect" / "weeds"
    (run / "weights").mkdir(parents=True)
    make_adapter(run / "weights", vp.LoraConfig(r=2), "best", names=None)  # coco8's classes
    (run / "args.yaml").write_text(f"data: {coco8}\nimgsz: {IMGSZ}\n")
    assert cli(["--run", str(run), "--runs", "0"]) == 0
    report = json.loads((run / "weights" / "best.verify.json").read_text())
    assert report["ok"] and report["imgsz"] == [IMGSZ, IMGSZ]
    assert report["images"][0].startswith(str(coco8.parent))  # parity on the run's dataset


def test_clear_errors(tmp_path, lora_export, capsys):
    result, _ = lora_export
    model = vp.load_adapter(vp.load_base("yolo11n.pt"), result.file.with_suffix(".safetensors"))
    adapter = vp.save_adapter(model, tmp_path / "w.safetensors")  # no base recorded
    with pytest.raises(vp.AdapterFileError, match="another base model"):
        export(base="yolov8n.pt", adapter=adapter, imgsz=IMGSZ, verify=False)
    with pytest.raises(vp.AdapterFileError, match="not found"):
        export(base="yolo11n.pt", adapter=tmp_path / "missing.safetensors", verify=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        export(base=tmp_path / "missing.pt", adapter=adapter, verify=False)
    with pytest.raises(ValueError, match="does not record its base"):
        export(adapter=adapter, verify=False)
    with pytest.raises(ValueError, match="Unsupported export format 'tflite'"):
        export(base="yolo11n.pt", adapter=adapter, format="tflite")
    with pytest.raises(ValueError, match="INT8 calibrates on real images"):
        export(base="yolo11n.pt", adapter=adapter, quantize=8)
    with pytest.raises(FileNotFoundError, match="weights/best.safetensors"):
        export(run=tmp_path / "no_run")
    with pytest.raises(ValueError, match="Unsupported export format 'tflite'"):  # keywords override the options
        export(ExportOptions(base="yolo11n.pt", adapter=adapter), format="tflite")
    with pytest.raises(ValueError, match="quantize must be 32, 16 or 8, not 4"):
        export(ExportOptions(base="yolo11n.pt", adapter=adapter, quantize=4))
    with pytest.raises(TypeError, match="ExportOptions or keyword arguments"):
        export("yolo11n.pt", adapter=adapter)
    assert cli(["--adapter", str(adapter), "--base", "yolo11n.pt", "--format", "tflite"]) == 2
    assert "Unsupported export format" in capsys.readouterr().err


def test_unmerged_model_is_refused_by_the_exporter(tmp_path, lora_export):
    _, model = lora_export
    with pytest.raises(ValueError, match="merge them first"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=IMGSZ)
    plain = vp.merge(model)
    path = export_onnx(plain, tmp_path / "x.onnx", imgsz=IMGSZ)
    batches = [letterbox(sample_images(None)[0], (IMGSZ, IMGSZ))]
    ref, out = torch_outputs(model, batches)[0], onnx_outputs(path, batches)[0]
    assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
