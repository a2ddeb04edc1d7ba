"""Edge formats besides ONNX, through the Ultralytics exporter after merging: OpenVINO (FP32, FP16, INT8 via NNCF)
and NCNN (FP32, FP16 storage). ``pip install -e ".[edge]"`` installs what they need; nothing is downloaded at run
time (Ultralytics' NCNN export runs the ``pnnx`` binary shipped in the ``pnnx`` wheel).

Not offered: LiteRT/TFLite (Ultralytics 8.4 converts through ``litert-torch`` and ``ai-edge-litert``, which pin their
own torch and TensorFlow builds instead of the torch visionpeft trains with; Ultralytics runs that export in a separate
Python 3.12+ environment, ``EXPORT_ENVS["litert"]``), MNN, CoreML, TensorRT and the vendor formats (other machines or
SDKs outside PyPI).

Each file is verified like the ONNX exports (``verify_folder``): parity to the unmerged PyTorch model on real images,
latency at a given thread count through the format's own runtime, and with ``data`` the mAP through Ultralytics val.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .options import ExportOptions
from .report import Accuracy, Check, ExportReport, ExportResult, FileReport

#: format -> precisions offered (``quantize`` values)
EDGE_FORMATS = {"openvino": (32, 16, 8), "ncnn": (32, 16)}
#: largest output difference to the unmerged model accepted, relative to the output's scale, per precision
PARITY_LIMIT = {32: 1e-4, 16: 2e-2, 8: None}  # INT8 is judged by its mAP
#: mAP50-95 drop to the merged PyTorch model accepted with ``--val`` (issue 16: 0.5 point, INT8 1.5 points)
MAP_DROP_LIMIT = {32: 0.005, 16: 0.005, 8: 0.015}
NOT_OFFERED = {
    "litert": "LiteRT/TFLite: Ultralytics converts through litert-torch/ai-edge-litert, which pin their own torch and "
              "TensorFlow builds (Ultralytics runs that export in a separate Python 3.12+ environment); export the "
              "merged ONNX instead",
}
NOT_OFFERED["tflite"] = NOT_OFFERED["litert"]


def check_format(fmt: str, quantize: int) -> None:
    """Refuse a format or precision visionpeft does not export, in one line naming what it does."""
    fmt = fmt.lower()
    if fmt in NOT_OFFERED:
        raise ValueError(f"Unsupported export format '{fmt}', not offered: {NOT_OFFERED[fmt]}.")
    if fmt not in EDGE_FORMATS:
        raise ValueError(f"Unsupported export format '{fmt}': visionpeft exports onnx, "
                         f"{', '.join(EDGE_FORMATS)}.")
    if quantize not in EDGE_FORMATS[fmt]:
        raise ValueError(f"{fmt} exports take quantize {' or '.join(map(str, EDGE_FORMATS[fmt]))}, not {quantize}.")


@functools.cache
def openvino_telemetry_off() -> None:
    """Decline OpenVINO's usage telemetry in this process (it is opt-out: on unless a consent file says otherwise)
    without writing the user's ~/intel consent file: every ``openvino_telemetry.Telemetry`` then sees DECLINED."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # OpenVINO's tools then use their own stub
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED


def require(fmt: str) -> None:
    """Fail in one line when the format's packages are missing (Ultralytics would pip-install them)."""
    import importlib.util

    needs = {"openvino": ["openvino"], "ncnn": ["ncnn", "pnnx"]}[fmt]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(f"{fmt} export needs {', '.join(missing)}: pip install -e \".[edge]\" (or pip "
                                  f"install {' '.join(missing)}); visionpeft never installs packages at run time.")


def export_edge(model, fmt: str, stem: Path, imgsz: Sequence[int], quantize: int = 32, data: str | Path | None = None,
                calib: int = 128, metadata: dict | None = None) -> Path:
    """Export a plain (merged) ``DetectionModel`` with the Ultralytics exporter; the model folder it wrote.

    ``stem``: ``<folder>/<name>``; the folder is ``<name>[_int8|_fp16]_<fmt>_model`` beside it (Ultralytics' naming,
    which ``YOLO(path)`` recognises). INT8 (OpenVINO, NNCF) calibrates on ``calib`` images of ``data``'s *train*
    split (Ultralytics' default is val, which would leak into ``--val``'s mAP). ``metadata`` goes into the folder's
    ``metadata.yaml`` under ``visionpeft``.
    """
    import copy

    from ultralytics.engine.exporter import Exporter
    from ultralytics.utils import YAML

    from ..integrations.ultralytics import set_export_name
    from .onnx import _quiet, telemetry_off

    require(fmt)
    if fmt == "openvino":
        openvino_telemetry_off()
    telemetry_off()  # the ONNX step some exporters take opens onnxruntime
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu()
    set_export_name(model, stem.with_suffix(".pt"))  # the exporter names its output after this file
    overrides = {"format": fmt, "imgsz": list(imgsz), "batch": 1, "device": "cpu", "dynamic": False,
                 "quantize": None if quantize == 32 else quantize, "nms": None, "verbose": False, "mode": "export"}
    if quantize == 8:
        if data is None:
            raise ValueError("INT8 calibrates on real images: pass data=<dataset YAML or name>.")
        overrides.update(data=str(data), split="train", fraction=_fraction(data, calib))
    with _quiet():
        out = Exporter(overrides=overrides)(model=model)
    if not out or not Path(out).is_dir():
        raise RuntimeError(f"The Ultralytics {fmt} exporter produced no model folder for '{stem}'; see the log above.")
    out = Path(out)
    if quantize == 16 and "_fp16_" not in out.name:  # Ultralytics names FP16 folders like FP32 ones
        out = out.rename(out.with_name(out.name.replace(f"_{fmt}_model", f"_fp16_{fmt}_model")))
    if metadata is not None:
        meta = YAML.load(out / "metadata.yaml")
        YAML.save(out / "metadata.yaml", {**meta, "visionpeft": {**metadata, "precision": f"{fmt}-{quantize}"}})
    return out


def _fraction(data: str | Path, calib: int) -> float:
    """The share of the train split that gives about ``calib`` calibration images (Ultralytics takes a fraction)."""
    from .images import split_images

    n = len(split_images(data, "train", 10**9))
    return min(1.0, max(calib, 1) / max(n, 1))


def runner(path: str | Path, threads: int | None = 1) -> Callable[[np.ndarray], np.ndarray]:
    """``f(image batch (1, 3, h, w) float32) -> first output`` through the format's own runtime on CPU.

    OpenVINO runs FP32 models in FP32 (``INFERENCE_PRECISION_HINT``; some CPUs would default to bf16) with
    ``threads`` inference threads and the latency hint; NCNN on its CPU path with ``threads`` threads.
    """
    path = Path(path)
    if path.name.endswith("_openvino_model"):
        openvino_telemetry_off()
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(next(path.glob("*.xml"))), "CPU", config)
        output = compiled.output(0)
        return lambda x: np.asarray(compiled(x)[output], dtype=np.float32)
    if path.name.endswith("_ncnn_model"):
        import ncnn

        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        if threads:
            net.opt.num_threads = threads
        param = next(path.glob("*.param"))
        net.load_param(str(param))
        net.load_model(str(param.with_suffix(".bin")))
        first = sorted(net.output_names())[0]  # as Ultralytics' NCNNBackend orders them

        def run(x: np.ndarray) -> np.ndarray:
            with net.create_extractor() as ex:
                ex.input(net.input_names()[0], ncnn.Mat(np.ascontiguousarray(x[0])))
                return np.array(ex.extract(first)[1], dtype=np.float32)[None]

        return run
    raise ValueError(f"'{path}' is not an OpenVINO or NCNN model folder (*_openvino_model, *_ncnn_model).")


def latency(paths: Sequence[str | Path], imgsz: Sequence[int], runs: int = 50, warmup: int = 5,
            threads: int | None = 1) -> list[float]:
    """Median latency (ms) of each model folder, run in turn so load on the machine hits them alike."""
    from .verify import median_ms

    x = np.random.default_rng(0).random((1, 3, *imgsz), dtype=np.float32)
    return median_ms([functools.partial(runner(p, threads), x) for p in paths], runs, warmup)


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def verify_folder(reference, folder: Path, quantize: int, batches: Sequence[np.ndarray], imgsz: Sequence[int],
                  merged=None, data: str | Path | None = None, runs: int = 50, threads: int | None = 1) -> ExportReport:
    """The verification report of one exported model folder (like ``verify.verify`` for ONNX files)."""
    from .verify import parity, torch_outputs, val_onnx, val_torch

    ref = torch_outputs(reference, batches)
    f = runner(folder, threads)
    entry = FileReport(file=str(folder), size_mb=round(folder_mb(folder), 3),
                       parity=parity(ref, [f(b) for b in batches]))
    if runs:
        entry.latency_ms = latency([folder], imgsz, runs=runs, threads=threads)[0]
    report = ExportReport(imgsz=list(imgsz), threads=threads, runs=runs, exports={str(quantize): entry})
    limit = PARITY_LIMIT[quantize]
    if limit is not None:
        rel = entry.parity.max_rel
        report.checks["parity"] = Check(ok=rel <= limit, value=rel, limit=limit)
    if data is not None:
        accuracy = val_onnx(folder, data)  # Ultralytics val reads any of its formats
        entry.map50_95, entry.map50 = accuracy["map50_95"], accuracy["map50"]
        if merged is not None:
            report.pytorch = Accuracy(**val_torch(merged, data, max(imgsz)))
            drop = report.pytorch.map50_95 - entry.map50_95
            report.checks["map_drop"] = Check(ok=drop <= MAP_DROP_LIMIT[quantize], value=drop,
                                              limit=MAP_DROP_LIMIT[quantize])
    return report


def export_folder(reference, merged, metadata: dict, options: ExportOptions, data: Path | None) -> ExportResult:
    """``pipeline.export`` for an edge format: the merged model exported, moved into ``out`` whole, verified.

    ``options`` are resolved (``adapter`` a path, ``imgsz`` a list); ``data`` is the dataset YAML.
    """
    from ultralytics.utils import LOGGER

    from .images import letterbox, sample_images
    from .staging import replace_dir, staged

    fmt, quantize, imgsz, adapter = options.format, options.quantize, options.imgsz, Path(options.adapter)
    precision = options.precision
    out = Path(options.out) if options.out is not None else adapter.parent
    if out.suffix == ".onnx":
        raise ValueError(f"--out '{out}' is an ONNX file name; a {fmt} model is a folder: pass a folder.")
    with staged(out) as stage:
        folder = export_edge(merged, fmt, stage / adapter.stem, imgsz, quantize, data, options.calib, metadata)
        folder = replace_dir(folder, out / folder.name)
    result = ExportResult(file=folder, files={precision: folder}, adapter=metadata["adapter"],
                          metadata={**metadata, "format": fmt, "precision": precision})
    LOGGER.info(f"visionpeft: exported adapter '{metadata['adapter']}' merged into '{metadata['base']}': {folder}")
    if not options.verify:
        return result
    batches = [letterbox(p, imgsz) for p in sample_images(data, "val", 4)]
    report = verify_folder(reference, folder, quantize, batches, imgsz, merged=merged if options.val else None,
                           data=data if options.val else None, runs=options.runs, threads=options.threads)
    report.adapter, report.format, report.precision = metadata["adapter"], fmt, precision
    result.report = report
    result.report_file = report.write(folder.with_name(f"{folder.name}.verify.json"))
    LOGGER.info(f"{report.table()}\nvisionpeft: verification written to {result.report_file}")
    return result
