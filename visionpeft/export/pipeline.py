"""Base + adapter (or a training run) -> merged ONNX (FP32, FP16 or INT8) -> verification report.

The adapter is loaded onto its base and merged into a plain ``DetectionModel`` before the Ultralytics exporter sees
it, so Conv+BN fusion folds the adapted weights; the unmerged model stays as the reference the exports are checked
against.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..inject import adapted_modules, merge, peft_state
from ..io import AdapterFileError, load_adapter, read_adapter
from ..models import load_base
from ..train.data import resolve_dataset
from . import verify as checks
from .images import letterbox, sample_images, split_images
from .onnx import base_export, export_onnx, read_metadata, update_metadata
from .quantize import to_fp16, to_int8

FORMATS = ("onnx",)
PRECISIONS = {32: "fp32", 16: "fp16", 8: "int8"}
METADATA_FORMAT = "visionpeft.onnx.v1"


@dataclass
class ExportResult:
    """What ``export`` wrote, and the verification report (``None`` when verification was skipped)."""

    file: Path  # the requested export
    files: dict[str, Path]  # every export written, by precision: {"fp32": ..., "int8": ...}
    adapter: str
    base_file: Path | None = None  # the plain base model's export the files were compared with
    report: dict | None = None
    report_file: Path | None = None
    metadata: dict = field(default_factory=dict)  # the visionpeft metadata stored in the files

    @property
    def ok(self) -> bool:
        """Whether every verification check passed (True when nothing was verified)."""
        return self.report is None or bool(self.report["ok"])

    def __str__(self) -> str:
        return checks.format_table(self.report) if self.report else "\n".join(str(f) for f in self.files.values())


def _read_yaml(path: Path) -> dict:
    from ultralytics.utils import YAML

    return YAML.load(path) if path.is_file() else {}


def resolve_inputs(base: str | Path | None, adapter: str | Path | None,
                   run: str | Path | None) -> tuple[str | Path, Path, dict, dict]:
    """``(base, adapter file, run args, adapter metadata)`` from the arguments of ``export``, with clear errors."""
    run_args: dict = {}
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise FileNotFoundError(f"Training run folder '{run}' not found. Pass the folder a visionpeft training "
                                    "run wrote (runs/detect/<name>), which holds weights/best.safetensors.")
        if adapter is None:
            adapter = run / "weights" / "best.safetensors"
            if not adapter.is_file():
                raise AdapterFileError(f"'{run}' has no weights/best.safetensors: it is not a visionpeft training run, "
                                       "or the run ended before its first epoch. Pass adapter=<file> instead.")
        run_args = _read_yaml(run / "args.yaml")
    if adapter is None:
        raise ValueError("Nothing to export: pass adapter=<adapter .safetensors> (with base=<weights>) or "
                         "run=<training run folder>.")
    adapter = Path(adapter)
    _, meta = read_adapter(adapter)
    if base is None:
        base = meta.get("base")
        if base is None:
            raise ValueError(f"'{adapter}' does not record its base model (it was not saved by the visionpeft "
                             "trainer): pass base=<the weights it was trained on>, e.g. base='yolo11n.pt'.")
    return base, adapter, run_args, meta


def _imgsz(value) -> list[int]:
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip().startswith("[") else int(value)
    size = [int(value)] * 2 if isinstance(value, (int, float)) else [int(v) for v in value]
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"imgsz must be one size or [height, width], each >= 32; got {value!r}.")
    return size


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(
    base: str | Path | None = None,
    adapter: str | Path | None = None,
    run: str | Path | None = None,
    format: str = "onnx",
    quantize: int = 32,
    imgsz: int | list[int] | None = None,
    dynamic: bool = False,
    opset: int | None = None,
    val: bool = False,
    data: str | Path | None = None,
    out: str | Path | None = None,
    verify: bool = True,
    calib: int = 128,
    runs: int = 50,
    threads: int | None = 1,
) -> ExportResult:
    """Export a trained adapter, merged into its base, to ONNX and verify the files.

    Inputs: ``adapter`` (a ``.safetensors`` adapter file) with ``base`` (the weights it was trained on; default: the
    path the trainer recorded in the adapter), or ``run`` (a training run folder; its ``weights/best.safetensors``,
    and its ``data`` and ``imgsz`` as defaults). ``quantize``: 32, 16 (FP16 weights, FP32 inputs/outputs) or 8
    (static INT8, calibrated on ``calib`` images of the ``data`` train split). The FP32 file is always written
    (FP16/INT8 derive from it): ``<out>/<adapter stem>.onnx``, ``..._fp16.onnx``, ``..._int8.onnx``, beside the
    adapter unless ``out`` (a folder or a ``.onnx`` path) says otherwise.

    Verification (``verify``) writes ``<file>.verify.json`` beside the requested file: parity against the unmerged
    PyTorch model on real images, node counts against the plain base's export, size, median latency over ``runs``
    runs on ``threads`` onnxruntime threads (1: stable numbers on a busy machine, like a small edge CPU), and with
    ``val`` the mAP of every file and of the PyTorch model on ``data``.
    """
    if str(format).lower() not in FORMATS:
        raise ValueError(f"Unsupported export format '{format}'. visionpeft exports {list(FORMATS)}; for other "
                         "formats export the merged model with Ultralytics (YOLO(model).export(format=...)).")
    try:
        precision = PRECISIONS[int(quantize)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"quantize must be 32, 16 or 8, not {quantize!r}.") from None
    base, adapter, run_args, meta = resolve_inputs(base, adapter, run)
    data = data if data is not None else run_args.get("data")
    imgsz = _imgsz(imgsz if imgsz is not None else run_args.get("imgsz", 640))
    if precision == "int8" and data is None:
        raise ValueError("INT8 calibrates on real images: pass data=<dataset YAML or name> (its train split is used).")
    if val and data is None:
        raise ValueError("val needs a dataset: pass data=<dataset YAML or name>.")
    with tempfile.TemporaryDirectory(prefix="visionpeft-export-") as tmp:
        data_yaml = resolve_dataset(data, tmp) if data is not None else None  # names like 'crop_weed' work too
        return _export(base, adapter, meta, precision, imgsz, dynamic, opset, val, data_yaml, str(data or ""), out,
                       verify, calib, runs, threads)


def _export(base, adapter: Path, meta: dict, precision: str, imgsz: list[int], dynamic: bool, opset: int | None,
            val: bool, data: Path | None, data_name: str, out: str | Path | None, verify: bool, calib: int, runs: int,
            threads: int | None) -> ExportResult:
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import LOGGER

    from .. import __version__

    try:
        model = load_base(base)
    except FileNotFoundError as e:
        hint = "" if meta.get("base") is None or str(base) != meta.get("base") else (
            "\nThe adapter records this base path from training; pass base=<path> if the weights moved.")
        raise FileNotFoundError(f"{e}{hint}") from e
    if not isinstance(model, DetectionModel):
        raise TypeError(f"ONNX export supports Ultralytics YOLO detectors; '{base}' is a {type(model).__name__}.")
    plain = copy.deepcopy(model) if verify else None  # the base export the adapted one is compared with
    load_adapter(model, adapter)  # checks the base fingerprint
    state = peft_state(model)
    name = state["active"]
    info = state["adapters"][name]
    merged = merge(model)
    mergeable = not any(True for _ in adapted_modules(merged))
    metadata = {
        "format": METADATA_FORMAT, "visionpeft_version": __version__, "adapter": name,
        "methods": sorted(set(info["targets"].values())), "configs": info["configs"], "targets": len(info["targets"]),
        "mergeable": mergeable, "base": str(base), "base_fingerprint": state["fingerprint"],
        "adapter_file": adapter.name, "adapter_sha256": _sha256(adapter), "precision": "fp32",
    }

    out = Path(out) if out is not None else adapter.parent
    fp32_path = out if out.suffix == ".onnx" else out / f"{adapter.stem}.onnx"
    files = {"fp32": export_onnx(merged, fp32_path, imgsz=imgsz, dynamic=dynamic, opset=opset, metadata=metadata,
                                 data=data_name or None)}
    imgsz = _imgsz(read_metadata(files["fp32"])["imgsz"])  # the exporter may round to the model's stride
    if precision == "fp16":
        files["fp16"] = to_fp16(files["fp32"], fp32_path.with_name(f"{fp32_path.stem}_fp16.onnx"))
    elif precision == "int8":
        calibration = [letterbox(p, imgsz) for p in split_images(data, "train", calib)]
        files["int8"] = to_int8(files["fp32"], fp32_path.with_name(f"{fp32_path.stem}_int8.onnx"), calibration)
    if precision != "fp32":
        update_metadata(files[precision], {"precision": precision})
    result = ExportResult(file=files[precision], files=files, adapter=name,
                          metadata={**metadata, "precision": precision})
    LOGGER.info(f"visionpeft: exported adapter '{name}' merged into '{base}': "
                + ", ".join(f"{k} {v}" for k, v in files.items()))
    if not verify:
        return result

    fp = state["fingerprint"]
    result.base_file = base_export(plain, imgsz, dynamic, opset, key=f"{fp['architecture']}-{fp['weights']}")
    report = checks.verify(model, files, result.base_file, sample_images(data, "val", 4), imgsz, mergeable,
                           merged=merged if val else None, data=data if val else None, runs=runs, threads=threads)
    result.report = {"adapter": name, "methods": metadata["methods"], "mergeable": mergeable, "base": str(base),
                     "adapter_file": str(adapter), **report}
    result.report_file = checks.write_report(result.report, result.file.with_suffix(".verify.json"))
    LOGGER.info(f"{checks.format_table(result.report)}\nvisionpeft: verification written to {result.report_file}")
    return result
