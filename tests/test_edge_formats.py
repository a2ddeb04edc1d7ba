"""Edge formats and INT8 (issue 16 parts 3 and 4): OpenVINO / NCNN through the Ultralytics exporter, the faster DFL
decode of visionpeft's INT8 ONNX, and the edge benchmark script at a tiny size. Real yolo11n at 64 px."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from test_edge_patch import IMGSZ, NAMES, make_adapter

import visionpeft as vp
from visionpeft.export import export
from visionpeft.export.images import letterbox, sample_images, split_images
from visionpeft.export.int8_graph import float_nodes, last_axis_dfl, upsample_as_concat
from visionpeft.export.onnx import export_onnx
from visionpeft.export.quantize import to_int8
from visionpeft.export.verify import onnx_outputs

EDGE = all(importlib.util.find_spec(m) for m in ("openvino", "nncf", "ncnn", "pnnx"))
needs_edge = pytest.mark.skipif(not EDGE, reason='needs pip install -e ".[edge]"')


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter"), vp.DoraConfig(r=4), NAMES)


def test_last_axis_dfl_gives_identical_outputs_and_stays_float_in_int8(tmp_path, data):
    fp32 = export_onnx(vp.load_base("yolo11n.pt"), tmp_path / "base.onnx", imgsz=IMGSZ)
    model = onnx.load(str(fp32))
    assert last_axis_dfl(model) == 1 and last_axis_dfl(model) == 0  # rewritten once; the new graph has no pattern
    onnx.checker.check_model(model, full_check=True)
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(model, str(rewritten))
    images = [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(data, "val", 3)]
    for a, b in zip(onnx_outputs(fp32, images), onnx_outputs(rewritten, images), strict=True):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and not any(n.op_type == "Conv" and "dfl" in n.name for n in model.graph.node)
    projection = next(n for n in model.graph.node if n.name.endswith("/last_axis"))
    assert projection.name in float_nodes(model)  # decode: never quantized

    int8 = to_int8(fp32, tmp_path / "int8.onnx", [letterbox(p, (IMGSZ, IMGSZ)) for p in split_images(data, "train", 4)])
    q = onnx.load(str(int8))
    matmul = next(n for n in q.graph.node if n.name.endswith("/last_axis"))  # to_int8 rewrites before quantizing
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers.get(matmul.input[1]) != "DequantizeLinear" and producers[matmul.input[0]] == "Softmax"
    softmax = next(n for n in q.graph.node if n.output[0] == matmul.input[0])
    assert [a.i for a in softmax.attribute if a.name == "axis"] == [-1]
    assert {p.key for p in q.metadata_props} >= {"names", "imgsz", "stride"}


def test_upsample_as_concat_gives_identical_outputs(tmp_path, data):
    fp32 = export_onnx(vp.load_base("yolo11n.pt"), tmp_path / "base.onnx", imgsz=IMGSZ)
    model = onnx.load(str(fp32))
    assert sum(n.op_type == "Resize" for n in model.graph.node) == 2  # yolo11n's neck: two nearest 2x upsamples
    assert upsample_as_concat(model) == 2 and upsample_as_concat(model) == 0
    assert not any(n.op_type == "Resize" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(model, str(rewritten))
    images = [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(data, "val", 3)]
    for a, b in zip(onnx_outputs(fp32, images), onnx_outputs(rewritten, images), strict=True):
        assert np.array_equal(a, b)  # copies of the same values


def test_int8_concats_share_their_output_params_and_biases_follow(tmp_path, data):
    from onnx import numpy_helper

    fp32 = export_onnx(vp.load_base("yolo11n.pt"), tmp_path / "base.onnx", imgsz=IMGSZ)
    int8 = to_int8(fp32, tmp_path / "int8.onnx", [letterbox(p, (IMGSZ, IMGSZ)) for p in split_images(data, "train", 4)])
    graph = onnx.load(str(int8)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def dequantized(t: str) -> bool:
        return t in producer and producer[t].op_type == "DequantizeLinear"

    assert not any(n.op_type == "Resize" for n in graph.node)  # upsampling: copies (upsample_as_concat)
    concats = [n for n in graph.node if n.op_type == "Concat" and all(dequantized(t) for t in n.input)]
    assert len(concats) >= 15  # yolo11n's backbone and neck concats (the decode's stay float)
    for n in concats:  # one scale and zero point: onnxruntime copies instead of requantizing each input
        q = consumers[n.output[0]][0]
        assert q.op_type == "QuantizeLinear"
        for t in n.input:
            assert values[producer[t].input[1]] == values[q.input[1]]
            assert values[producer[t].input[2]] == values[q.input[2]]
    float_bias = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer}
    checked = 0
    for n in graph.node:  # int32 biases: scale = input scale x weight scale, the float bias within a step (rounded
        # twice: by onnxruntime at the input's own scale, <= the shared one, and again when the input's scale grew)
        if n.op_type == "Conv" and len(n.input) == 3 and all(dequantized(t) for t in n.input):
            x, w, b = (producer[t] for t in n.input)
            scale = values[b.input[1]]
            np.testing.assert_allclose(scale, values[x.input[1]] * values[w.input[1]], rtol=1e-6)
            bias = float_bias[b.input[0].removesuffix("_quantized")]
            assert np.all(np.abs(values[b.input[0]] * scale.astype(np.float64) - bias) <= scale + 1e-7)
            checked += 1
    assert checked > 50
    images = [letterbox(p, (IMGSZ, IMGSZ)) for p in sample_images(data, "val", 2)]
    for a, b in zip(onnx_outputs(fp32, images), onnx_outputs(int8, images), strict=True):
        boxes, scores = np.abs(a - b)[0, :4], np.abs(a - b)[0, 4:]
        assert boxes.mean() < 0.02 * IMGSZ and scores.max() < 0.2  # int8 rounding, not a broken rescale


def test_unsupported_formats_are_refused_with_the_reason(adapter):
    with pytest.raises(ValueError, match="Unsupported export format 'tflite', not offered: LiteRT/TFLite.*torch"):
        export(adapter=adapter, format="tflite", imgsz=IMGSZ)
    with pytest.raises(ValueError, match="ncnn exports take quantize 32 or 16, not 8"):
        export(adapter=adapter, format="ncnn", quantize=8, imgsz=IMGSZ)
    with pytest.raises(ValueError, match="Unsupported export format 'coreml'"):
        export(adapter=adapter, format="coreml", imgsz=IMGSZ)


@needs_edge
@pytest.mark.parametrize("fmt,quantize", [("openvino", 32), ("openvino", 8), ("ncnn", 32)])
def test_edge_format_is_verified_against_the_unmerged_model(adapter, data, tmp_path, fmt, quantize):
    from ultralytics import YOLO

    result = export(adapter=adapter, format=fmt, quantize=quantize, imgsz=IMGSZ, data=data, out=tmp_path, runs=3,
                    calib=4)
    folder = result.file
    assert folder.parent == tmp_path and folder.name == f"crops{'_int8' if quantize == 8 else ''}_{fmt}_model"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, f"{folder.name}.verify.json"])
    e = next(iter(result.report.exports.values()))
    assert e.latency_ms > 0 and e.size_mb > 0 and f"{fmt} {result.metadata['precision']}" in str(result)
    if quantize == 32:
        assert result.ok and e.parity.max_rel <= 1e-4  # the unmerged adapter model, reproduced
    else:
        assert e.size_mb < 0.5 * 10  # int8 weights
    report = json.loads(result.report_file.read_text())  # the keys, in the order, report files have always had
    assert list(report) == ["adapter", "format", "precision", "imgsz", "threads", "runs", "exports", "checks", "ok"]
    assert list(report["exports"]) == [str(quantize)] and report == json.loads(json.dumps(result.report.to_dict()))
    meta = yaml.safe_load((folder / "metadata.yaml").read_text())
    assert meta["names"] == {0: "crop", 1: "weed"} and meta["visionpeft"]["adapter"] == "crops"
    boxes = YOLO(str(folder), task="detect").predict(sample_images(data, "val", 1)[0], imgsz=IMGSZ, verbose=False)
    assert boxes[0].names == {0: "crop", 1: "weed"}


def test_bench_edge_writes_its_tables(adapter, tmp_path):
    from visionpeft.bench.edge import main

    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "best.safetensors").write_bytes(adapter.read_bytes())
    (run / "args.yaml").write_text(yaml.safe_dump({"data": "crop_weed", "imgsz": IMGSZ}))
    out = tmp_path / "bench"
    assert main(["--run", str(run), "--parts", "fleet,int8", "--adapters", "1", "2", "--runs", "2", "--calib", "4",
                 "--int8-runs", str(run),
                 "--threads", "1", "--no-val", "--base-data", "coco8", "--out", str(out)]) == 0
    fleet = list(csv.DictReader((out / "fleet.csv").read_text().splitlines()))
    assert [(r["N"], r["setup"]) for r in fleet] == [
        ("1", "fleet, keep 1 session"), ("1", "merged ONNX from disk, 1 session"),
        ("2", "fleet, keep 1 session"), ("2", "fleet, keep 2 sessions"), ("2", "merged ONNX from disk, 1 session"),
        ("2", "merged ONNX from disk, 2 sessions")]
    assert all(float(r["rss_mb"]) > 0 and float(r["build_ms"]) > 0 for r in fleet)
    assert float(fleet[2]["switch_ms"]) > 100 * float(fleet[3]["switch_ms"])  # rebuilt vs cached session
    assert float(fleet[2]["disk_mb"]) < 0.7 * float(fleet[5]["disk_mb"])  # base + 2 patches < 2 merged files
    int8 = list(csv.DictReader((out / "int8.csv").read_text().splitlines()))
    assert [r["file"] for r in int8] == ["FP32 ONNX", "visionpeft INT8", "Ultralytics INT8 (quantize=8)"] * 4
    assert [r["model"] for r in int8[::3]] == ["adapter (merged)", "adapter: crop_weed", "plain base",
                                              "mean of 3 models"]
    ratios = [float(r["x_fp32_1t"]) for r in int8[1:9:3]]  # visionpeft INT8 of each model, then their mean
    assert float(int8[10]["x_fp32_1t"]) == pytest.approx(np.mean(ratios))
    assert all(float(r["size_mb"]) < 0.4 * float(int8[0]["size_mb"]) for r in int8[1:3])
    text = (out / "results.md").read_text()
    assert "## Several tasks on one device" in text and "## INT8 ONNX" in text
