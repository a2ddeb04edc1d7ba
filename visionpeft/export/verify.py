"""Evidence that an export is the model that was trained: parity, graph size, file size, latency, accuracy.

* parity: raw outputs of onnxruntime against the *unmerged* PyTorch adapter model on real images, so a wrong merge,
  a fusion that dropped adapters, or a broken conversion shows up as a difference;
* graph: node and initializer counts against the plain base model's export (a mergeable method adds no node);
* size and onnxruntime CPU latency (median, the files timed in turn so load on the machine hits them alike);
* optionally mAP50-95 through Ultralytics val, of each ONNX file and of the merged PyTorch model.
"""

from __future__ import annotations

import copy
import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx import telemetry_off
from .report import Accuracy, Check, ExportReport, FileReport, Parity

#: largest fp32 output difference accepted, relative to the output's scale (its largest magnitude)
PARITY_LIMIT = 1e-4


def graph_stats(path: str | Path) -> FileReport:
    import onnx

    graph = onnx.load(str(path)).graph
    return FileReport(file=str(path), size_mb=round(Path(path).stat().st_size / 2**20, 3), nodes=len(graph.node),
                      initializers=len(graph.initializer))


def _session(path: str | Path, threads: int | None):
    import onnxruntime as ort

    telemetry_off()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(path: str | Path, batches: Sequence[np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """The first output of the ONNX model for each batch, as float32."""
    session = _session(path, threads)
    name = session.get_inputs()[0].name
    return [np.asarray(session.run(None, {name: b})[0], dtype=np.float32) for b in batches]


@torch.no_grad()
def torch_outputs(model: nn.Module, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The first (decoded) output of the PyTorch model in eval mode for each batch."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    try:
        out = []
        for b in batches:
            y = model(torch.from_numpy(b).to(p.device, p.dtype))
            y = y[0] if isinstance(y, (list, tuple)) else y
            out.append(y.float().cpu().numpy())
        return out
    finally:
        model.train(was_training)


def parity(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> Parity:
    """Differences of ``outputs`` from ``reference``; rows 0-3 are box coordinates (pixels), the rest class scores."""
    ref, out = np.concatenate(reference), np.concatenate(outputs)
    if ref.shape != out.shape:
        raise ValueError(f"Output shapes differ: PyTorch {ref.shape}, ONNX {out.shape}.")
    diff = np.abs(ref - out)
    scale = float(np.abs(ref).max()) or 1.0
    return Parity(max_abs=float(diff.max()), mean_abs=float(diff.mean()), output_scale=scale,
                  max_rel=float(diff.max()) / scale, box_max_abs=float(diff[:, :4].max()),
                  score_max_abs=float(diff[:, 4:].max()) if ref.shape[1] > 4 else 0.0)


def median_ms(calls: Sequence[Callable[[], object]], runs: int = 50, warmup: int = 5) -> list[float]:
    """Median time (ms) of each call; the calls take turns, so machine load affects all alike.

    Turns are blocks of consecutive runs (5 rounds), not single runs: a runtime's idle pool threads spin for a while
    after each run and, with several threads per model, would steal the cores from the next model's run (measured:
    a 2-thread FP32 ONNX at 43 ms interleaved run by run vs 13 ms in blocks).
    """
    times: list[list[float]] = [[] for _ in calls]
    block = max(1, runs // 5)
    for i in range(0, runs, block):
        for call, t in zip(calls, times, strict=True):
            for _ in range(warmup if i == 0 else 1):  # warm-up, then one untimed run to wake the pool again
                call()
            for _ in range(min(block, runs - i)):
                start = time.perf_counter()
                call()
                t.append(time.perf_counter() - start)
    return [1000 * float(np.median(t)) for t in times]


def latency_ms(paths: Sequence[str | Path], imgsz: Sequence[int], runs: int = 50, warmup: int = 5,
               threads: int | None = 1) -> list[float]:
    """Median onnxruntime CPU latency of each file (:func:`median_ms`)."""
    x = np.random.default_rng(0).random((1, 3, *imgsz), dtype=np.float32)
    sessions = [_session(p, threads) for p in paths]
    calls = [functools.partial(s.run, None, {s.get_inputs()[0].name: x}) for s in sessions]
    return median_ms(calls, runs, warmup)


def val_onnx(path: str | Path, data: str | Path) -> dict:
    """mAP of an ONNX file through Ultralytics val (at its export size; letterboxed square, batch 1)."""
    from ultralytics import YOLO

    telemetry_off()  # Ultralytics' AutoBackend opens its own onnxruntime session
    with tempfile.TemporaryDirectory() as tmp:
        metrics = YOLO(str(path), task="detect").val(data=str(data), batch=1, rect=False, workers=0, plots=False,
                                                     verbose=False, device="cpu", project=tmp, name="val")
    return {"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50)}


def val_torch(model: nn.Module, data: str | Path, imgsz: int) -> dict:
    """mAP of a PyTorch DetectionModel through Ultralytics val, preprocessed like the ONNX files (rect=False)."""
    from ultralytics.models.yolo.detect import DetectionValidator

    with tempfile.TemporaryDirectory() as tmp:
        args = {"data": str(data), "imgsz": imgsz, "batch": 8, "rect": False, "workers": 0, "plots": False,
                "verbose": False, "device": "cpu", "project": tmp, "name": "val", "mode": "val"}
        validator = DetectionValidator(args=args)
        validator(model=copy.deepcopy(model).float())
    return {"map50_95": float(validator.metrics.box.map), "map50": float(validator.metrics.box.map50)}


def verify(reference: nn.Module, files: dict[str, Path], base_file: Path | None, images: Sequence[Path],
           imgsz: Sequence[int], mergeable: bool, merged: nn.Module | None = None, data: str | Path | None = None,
           runs: int = 50, threads: int | None = 1) -> ExportReport:
    """The verification report of the exported ``files`` (``{"fp32": path, "int8": path, ...}``).

    ``reference`` is the unmerged adapter model; ``merged`` (for ``data``-based mAP) the merged PyTorch model.
    """
    from .images import letterbox

    batches = [letterbox(p, imgsz) for p in images]
    ref = torch_outputs(reference, batches)
    report = ExportReport(imgsz=list(imgsz), images=[str(p) for p in images], threads=threads, runs=runs, exports={})
    base = graph_stats(base_file) if base_file else None
    for precision, path in files.items():
        entry = graph_stats(path)
        entry.parity = parity(ref, onnx_outputs(path, batches, threads))
        if base and precision == "fp32":
            entry.extra_nodes = entry.nodes - base.nodes
        report.exports[precision] = entry

    entries = [*report.exports.values(), *([base] if base else [])]
    if runs:
        timings = latency_ms([e.file for e in entries], imgsz, runs=runs, threads=threads)
        for entry, ms in zip(entries, timings, strict=True):
            entry.latency_ms = ms
    fp32 = report.exports.get("fp32")
    for entry in report.exports.values():
        if fp32:
            entry.size_vs_fp32 = entry.size_mb / fp32.size_mb
        if fp32 and runs:
            entry.latency_vs_fp32 = entry.latency_ms / fp32.latency_ms
        if base and runs:
            entry.latency_vs_base = entry.latency_ms / base.latency_ms
    report.base = base

    if fp32:
        rel = fp32.parity.max_rel
        report.checks["parity_fp32"] = Check(ok=rel <= PARITY_LIMIT, value=rel, limit=PARITY_LIMIT)
    if base and fp32 and mergeable:
        extra = fp32.extra_nodes
        report.checks["no_extra_nodes"] = Check(ok=extra == 0, value=extra, limit=0)

    if data is not None:
        for entry in report.exports.values():
            accuracy = val_onnx(entry.file, data)
            entry.map50_95, entry.map50 = accuracy["map50_95"], accuracy["map50"]
        if merged is not None:
            report.pytorch = Accuracy(**val_torch(merged, data, max(imgsz)))
    return report
