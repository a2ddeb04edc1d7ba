"""Base + adapter (or a training run) -> merged ONNX (FP32, FP16 or INT8) -> verification report.

The adapter is loaded onto its base and merged into a plain ``DetectionModel`` before the Ultralytics exporter sees
it, so Conv+BN fusion folds the adapted weights; the unmerged model stays as the reference the exports are checked
against. An adapter that keeps the base classes exports the base beside its merged branch, all classes in one file.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import tempfile
from pathlib import Path

from .. import settings
from ..class_offset import names_offset, offset_dataset
from ..datasets import check_class_names, load_dataset, resolve_dataset
from ..fonts import ensure_fonts
from ..inject import adapted_modules, keep_base_layer, merge, peft_state, with_base
from ..io import AdapterFileError, load_adapter, read_adapter, replace_file
from ..models import load_base
from . import verify as checks
from .images import letterbox, sample_images, split_images
from .onnx import base_export, export_onnx, read_metadata, update_metadata
from .options import ExportOptions
from .quantize import to_fp16, to_int8
from .report import ExportResult
from .staging import staged

METADATA_FORMAT = "visionpeft.onnx.v1"
NAMES_FIX = ("pass the dataset the adapter was trained on, or export anyway with check_names=False "
             "(--allow-names-mismatch)")


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
        base = recorded_base(meta, adapter)
    return base, adapter, run_args, meta


def recorded_base(meta: dict, adapter: Path) -> str | Path:
    """The base an adapter's metadata names, found only in the assets' weights folder.

    An adapter file is data a user may receive: the path it records is never opened (a crafted one could point at a
    pickle that runs code). Only its bare file name is looked up in ``weights/``; a ViT detector spec
    (``vitdet:...``) is rebuilt, its pretrained file likewise taken from ``weights/`` only.
    """
    recorded = meta.get("base")
    if not recorded:
        raise ValueError(f"'{adapter}' does not record its base model (it was not saved by the visionpeft "
                         "trainer): pass base=<the weights it was trained on> (--base), e.g. base='yolo11n.pt'.")
    if str(recorded).startswith("vitdet:"):
        return _recorded_vitdet(str(recorded), adapter)
    name = Path(str(recorded)).name
    found = settings.weights_dir() / name
    if name and found.is_file():
        return found
    raise FileNotFoundError(f"'{adapter}' was trained on base '{name}', which is not in {settings.weights_dir()}: "
                            f"pass base=<path to {name or 'the base weights'}> (--base).")


def _recorded_vitdet(recorded: str, adapter: Path) -> str:
    from ..vitdet.model import parse_spec

    spec = parse_spec(recorded)
    files = sorted(k for k in spec.timm_kwargs if k in {"checkpoint_path", "pretrained_cfg", "cache_dir"})
    if files:
        raise ValueError(f"'{adapter}' records a ViT detector base whose timm options {files} name files: pass "
                         "base=<the base spec or weights> (--base) yourself.")
    if isinstance(spec.pretrained, str):
        name = Path(spec.pretrained).name
        found = settings.weights_dir() / name
        if not (name and found.is_file()):
            raise FileNotFoundError(f"'{adapter}' was trained on a ViT backbone from '{name}', which is not in "
                                    f"{settings.weights_dir()}: pass base=<the base spec> (--base).")
        spec = dataclasses.replace(spec, pretrained=str(found))
    return spec.source()


def _imgsz(value) -> list[int]:
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip().startswith("[") else int(value)
    size = [int(value)] * 2 if isinstance(value, (int, float)) else [int(v) for v in value]
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"imgsz must be one size or [height, width], each >= 32; got {value!r}.")
    return size


def _val_data(data: Path, names: dict, folder: str) -> Path:
    """``data`` relabelled to a keep-base model's class indices (its classes follow the base's)."""
    offset = names_offset(names, load_dataset(data)[0].get("names"))
    return offset_dataset(data, names, offset or 0, folder)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(options: ExportOptions | None = None, /, **fields) -> ExportResult:
    """Export a trained adapter, merged into its base, to ONNX (or ``format`` openvino / ncnn: model folders, see
    ``visionpeft.export.formats``) and verify the files.

    Takes an ``ExportOptions`` or its fields as keywords (``export(run=..., quantize=8)``); keywords override the
    fields of ``options``.

    Inputs: ``adapter`` (a ``.safetensors`` adapter file) with ``base`` (the weights it was trained on; default: the
    file name the trainer recorded in the adapter, looked up in the assets' ``weights/`` only), or ``run`` (a
    training run folder; its ``weights/best.safetensors``, and its ``data`` and ``imgsz`` as defaults).
    ``quantize``: 32, 16 (FP16 weights, FP32 inputs/outputs) or 8
    (static INT8, calibrated on ``calib`` images of the ``data`` train split). The FP32 file is always written
    (FP16/INT8 derive from it): ``<out>/<adapter stem>.onnx``, ``..._fp16.onnx``, ``..._int8.onnx``, beside the
    adapter unless ``out`` (a folder or a ``.onnx`` path) says otherwise.

    Verification (``verify``) writes ``<file>.verify.json`` beside the requested file: parity against the unmerged
    PyTorch model on real images, node counts against the plain base's export, size, median latency over ``runs``
    runs on ``threads`` onnxruntime threads (1: stable numbers on a busy machine, like a small edge CPU), and with
    ``val`` the mAP of every file and of the PyTorch model on ``data``, whose class names must be the adapter's
    unless ``check_names=False``. The files appear together: a failed export leaves ``out`` as it was.
    """
    if options is not None and not isinstance(options, ExportOptions):
        raise TypeError(f"export takes an ExportOptions or keyword arguments (base=..., adapter=...), not "
                        f"{type(options).__name__}.")
    o = dataclasses.replace(options or ExportOptions(), **fields)
    fmt = str(o.format).lower()
    precision = o.precision
    if fmt != "onnx":
        from .formats import check_format

        check_format(fmt, int(o.quantize))  # OpenVINO, NCNN (visionpeft.export.formats); others refused with reason
    base, adapter, run_args, meta = resolve_inputs(o.base, o.adapter, o.run)
    data = o.data if o.data is not None else run_args.get("data")
    imgsz = _imgsz(o.imgsz if o.imgsz is not None else run_args.get("imgsz", 640))
    o = dataclasses.replace(o, base=base, adapter=adapter, format=fmt, quantize=int(o.quantize), imgsz=imgsz,
                            data=data)
    if precision == "int8" and data is None:
        raise ValueError("INT8 calibrates on real images: pass data=<dataset YAML or name> (its train split is used).")
    if o.val and data is None:
        raise ValueError("val needs a dataset: pass data=<dataset YAML or name>.")
    if data is not None:
        ensure_fonts()  # Ultralytics' check_det_dataset (calibration images, val) would download Arial.ttf
    with tempfile.TemporaryDirectory(prefix="visionpeft-export-") as tmp:
        data_yaml = resolve_dataset(data, tmp) if data is not None else None  # names like 'crop_weed' work too
        return _export(o, meta, data_yaml)


def _export(o: ExportOptions, meta: dict, data: Path | None) -> ExportResult:
    """``export`` once its options are resolved (``adapter`` a path, ``imgsz`` a list, ``data`` as given) and
    ``data`` is the dataset YAML."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import LOGGER

    from .. import __version__

    base, adapter, precision, imgsz, val = o.base, Path(o.adapter), o.precision, o.imgsz, o.val

    model = load_base(base)
    if not isinstance(model, DetectionModel):
        raise TypeError(f"ONNX export supports Ultralytics YOLO detectors; '{base}' is a {type(model).__name__}.")
    plain = copy.deepcopy(model) if o.verify else None  # the base export the adapted one is compared with
    load_adapter(model, adapter)  # checks the base fingerprint
    state = peft_state(model)
    name = state["active"]
    info = state["adapters"][name]
    if data is not None and o.check_names:
        check_class_names(model.names, data, fix=NAMES_FIX)
    merged = merge(model)
    mergeable = not any(True for _ in adapted_modules(merged))
    metadata = {
        "format": METADATA_FORMAT, "visionpeft_version": __version__, "adapter": name,
        "methods": sorted(set(info["targets"].values())), "configs": info["configs"], "targets": len(info["targets"]),
        "mergeable": mergeable, "base": str(base), "base_fingerprint": state["fingerprint"],
        "adapter_file": adapter.name, "adapter_sha256": _sha256(adapter), "precision": "fp32",
        **({"keep_base": info["keep_base"]} if info.get("keep_base") else {}),
    }

    if o.format != "onnx":
        from .formats import export_folder

        return export_folder(model, merged, metadata, o, data)
    out = Path(o.out) if o.out is not None else adapter.parent
    fp32_path = out if out.suffix == ".onnx" else out / f"{adapter.stem}.onnx"
    with staged(fp32_path.parent) as stage:
        written = {"fp32": export_onnx(merged, stage / fp32_path.name, imgsz=imgsz, dynamic=o.dynamic, opset=o.opset,
                                       metadata=metadata, data=str(o.data or "") or None)}
        imgsz = _imgsz(read_metadata(written["fp32"])["imgsz"])  # the exporter may round to the model's stride
        if precision == "fp16":
            written["fp16"] = to_fp16(written["fp32"], stage / f"{fp32_path.stem}_fp16.onnx")
        elif precision == "int8":
            calibration = [letterbox(p, imgsz) for p in split_images(data, "train", o.calib)]
            written["int8"] = to_int8(written["fp32"], stage / f"{fp32_path.stem}_int8.onnx", calibration)
        if precision != "fp32":
            update_metadata(written[precision], {"precision": precision})
        files = {k: replace_file(v, fp32_path.parent / v.name) for k, v in written.items()}
    result = ExportResult(file=files[precision], files=files, adapter=name,
                          metadata={**metadata, "precision": precision})
    LOGGER.info(f"visionpeft: exported adapter '{name}' merged into '{base}': "
                + ", ".join(f"{k} {v}" for k, v in files.items()))
    if not o.verify:
        LOGGER.info(f"visionpeft: export folder {result.file.parent.resolve()}")
        return result

    fp = state["fingerprint"]
    result.base_file = base_export(plain, imgsz, o.dynamic, o.opset, key=f"{fp['architecture']}-{fp['weights']}")
    keep = keep_base_layer(model) is not None  # its exports hold the base beside the branch: more nodes, by design
    reference = with_base(model, model) if keep else model  # the unmerged adapter (beside the untouched base)
    with tempfile.TemporaryDirectory(prefix="visionpeft-val-") as tmp:
        val_data = _val_data(data, merged.names, tmp) if val and keep else data
        report = checks.verify(reference, files, result.base_file, sample_images(data, "val", 4), imgsz,
                               mergeable and not keep, merged=merged if val else None,
                               data=val_data if val else None, runs=o.runs, threads=o.threads)
    report.adapter, report.methods, report.mergeable = name, metadata["methods"], mergeable
    report.adapter_file = str(adapter)
    result.report = report
    result.report_file = report.write(result.file.with_suffix(".verify.json"))
    LOGGER.info(f"{report.table()}\nvisionpeft: verification written to {result.report_file}"
                f"\nvisionpeft: export folder {result.file.parent.resolve()}")  # like the run folder of training
    return result
