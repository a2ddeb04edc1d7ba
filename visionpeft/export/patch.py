"""Patches for deployed models: an adapter's merged ONNX export as what a device adds to its base ONNX export.

``export_patch`` exports the merged model through ``export`` (the same exporter and metadata as a direct export) and
takes the plain base's export (or the device's own base file, ``base_onnx``), then writes a ``.vpatch`` (format in
``visionpeft.edge.apply``): the merged graph and metadata, the LoRA/DoRA factors of every adapted conv with the
Conv+BN fold scales the device needs to fold them the same way, and the few tensors stored whole (new class outputs,
changed biases). Before the file is written, the device's applier rebuilds every initializer here and each is compared
with the direct export, so a patch that would not reproduce the export is never written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import blockquant
from ..edge.apply import (
    FACTOR_PREFIX,
    FORMAT,
    KINDS,
    READS,
    RECIPE_KEY,
    PatchError,
    apply_patch,
    load_onnx,
    tensor_digest,
    write_model,
)
from ..inject import adapted_modules, merge
from ..io import load_adapter
from ..methods.dora import DoraAdapter
from ..methods.lora import LoraAdapter, update_factors
from ..models import load_base
from .onnx import _quiet, base_export
from .options import PRECISIONS, ExportOptions
from .quantize import to_fp16

#: largest difference allowed between a rebuilt tensor and the direct export's, relative to the tensor's largest
#: value: float32 rounding for fp32 files; for fp16 files the device starts from float16 base weights (the float32
#: ones are gone), so a rebuilt weight may land one float16 step away from the directly converted one
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3}


@dataclass
class PatchResult:
    """What ``export_patch`` wrote and how it compares with the direct export."""

    file: Path
    size: int  # bytes of the patch
    merged_size: int  # bytes of the merged ONNX the patch rebuilds
    base_file: Path  # the base ONNX the patch applies to
    precision: str
    counts: dict[str, int]  # initializers per recipe kind (base, patch, lora, dora)
    max_rel: float  # largest rebuilt-vs-exported tensor difference, relative to the tensor's scale

    def __str__(self) -> str:
        return (f"{self.file}: {self.size / 1e6:.3f} MB patch ({100 * self.size / self.merged_size:.1f} % of the "
                f"{self.merged_size / 1e6:.2f} MB merged {self.precision} ONNX) for base {self.base_file}; tensors "
                + ", ".join(f"{v} {k}" for k, v in self.counts.items()) + f"; max rel. difference {self.max_rel:.1e}")


def fold_scale(model: nn.Module, conv: str) -> torch.Tensor:
    """The per-output-channel factor the export multiplies conv ``conv``'s weight by (ones without a BatchNorm).

    Mirrors ``ultralytics.nn.tasks.BaseModel.fuse``: a ``Conv``/``DWConv`` with ``bn`` folds it through torch's
    ``fuse_conv_bn_weights`` (``gamma * rsqrt(var + eps)``); ``Conv2``, ``RepConv`` and ``RepVGGDW`` add several convs
    into one, which the device cannot redo from one weight.
    """
    from ultralytics.nn.modules import Conv, Conv2, RepConv, RepVGGDW

    parts = conv.split(".")
    for i in range(1, len(parts)):
        ancestor = model.get_submodule(".".join(parts[:i]))
        if isinstance(ancestor, (Conv2, RepConv, RepVGGDW)):
            raise PatchError(f"Adapted conv '{conv}' sits in an Ultralytics {type(ancestor).__name__}, whose fusion "
                             "adds several convs into one: patches cannot express it; export the merged ONNX instead.")
    parent = model.get_submodule(".".join(parts[:-1]))
    module = model.get_submodule(conv)
    if isinstance(parent, Conv) and parts[-1] == "conv" and hasattr(parent, "bn"):
        bn = parent.bn
        return (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach().float().cpu()
    return torch.ones(module.out_channels)


def compact(a: np.ndarray) -> np.ndarray:
    """``a`` as float16 when that loses nothing (adapter files are float16), else unchanged."""
    if a.dtype == np.float32:
        with np.errstate(over="ignore"):
            half = a.astype(np.float16)
        if np.array_equal(half.astype(np.float32), a):
            return half
    return a


def as_blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(data, scales, 4)`` if ``a`` is exactly a tensor that an adapter file stores in 4-bit blocks
    (``peft.file_bits: 4``), else ``None``. Rounding such a tensor again gives back its blocks bit for bit (each
    block's largest value is 7 of its steps, and the scale keeps 8 significant bits), so the device restores the
    file's very floats. 8-bit files round their scales to 4 bits, which a second rounding may not reproduce: their
    factors travel as float16, exact as well."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    try:
        data, scales = blockquant.quantize(t, 4)
    except ValueError:  # values beyond float16 scales
        return None
    exact = torch.equal(blockquant.dequantize(data, scales, 4, t.shape), t)
    return (data.numpy(), scales.numpy(), 4) if exact else None


def conv_factors(adapted: nn.Module, plain: nn.Module, merged: nn.Module) -> dict[str, dict]:
    """``{ONNX weight name: {"kind", "A", "B", "c", "ratio" | "g"}}`` for every conv with an active LoRA/DoRA."""
    out = {}
    for name, wrapper in adapted_modules(adapted):
        adapter = wrapper.adapters[wrapper.active_adapter] if wrapper.active_adapter is not None else None
        conv = wrapper.base_layer
        if not isinstance(adapter, (LoraAdapter, DoraAdapter)) or not isinstance(conv, nn.Conv2d):
            continue  # other adapters change tensors stored whole or add nodes the merged graph carries
        path = name.replace(".base_layer.", ".")  # the module's name in the plain and merged models
        s, s_merged = fold_scale(plain, path), fold_scale(merged, path)
        g = conv.groups
        a, b = update_factors(adapter, g)
        entry = {"A": a.float(), "B": b.float()}
        if isinstance(adapter, LoraAdapter):
            entry.update(kind="lora", c=s_merged * adapter.scaling)
            if not torch.equal(s, s_merged):
                entry["ratio"] = s_merged / s
        else:
            entry.update(kind="dora", c=s * adapter.scaling,
                         g=s_merged * adapter.magnitude.detach().float().flatten() * torch.sign(s))
        out[f"{path}.weight"] = {k: v if isinstance(v, str) else v.cpu().numpy() for k, v in entry.items()}
    return out


def weight_dtype(model) -> str | None:
    """The dtype most float initializers of an ONNX model have (``float32``, ``float16``)."""
    from onnx import helper

    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        dtype = str(helper.tensor_dtype_to_np_dtype(t.data_type))
        if dtype.startswith(("float", "bfloat")):
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else None


def build_patch(base_onnx, merged_onnx, factors: dict[str, dict], base_info: dict) -> tuple:
    """``(patch, recipe)``: the patch turning ``base_onnx`` into ``merged_onnx`` (``onnx.ModelProto``s), unverified."""
    import onnx
    from onnx import numpy_helper

    base = {t.name: numpy_helper.to_array(t) for t in base_onnx.graph.initializer}
    by_content = {tensor_digest({"": v}, [""]): k for k, v in base.items()}
    entries, stored = [], []
    for t in merged_onnx.graph.initializer:
        value = numpy_helper.to_array(t)
        key = t.name.replace(".base_layer.", ".")  # a conv inside a block that keeps its (bottleneck) wrapper
        if key in factors:
            f = factors[key]
            if key not in base or base[key].shape != value.shape:
                raise PatchError(f"The base ONNX has no weight '{key}' of shape {value.shape} for the adapted conv: "
                                 "it was not exported from this adapter's base; pass the matching base.")
            entry = {"name": t.name, "kind": f["kind"], "base": key}
            for key in ("A", "B", "c", "ratio", "g"):
                if key not in f:
                    continue
                entry[key] = name = f"{FACTOR_PREFIX}{t.name}/{key}"
                blocks = as_blocks(f[key]) if key in "AB" else None
                if blocks is not None:  # the factors of a 4-bit adapter file, as compact as the file
                    data, scales, bits = blocks
                    entry.setdefault("blocks", {})[key] = {"bits": bits, "shape": list(f[key].shape),
                                                           "scales": f"{name}/scales"}
                    stored += [numpy_helper.from_array(data, name), numpy_helper.from_array(scales, f"{name}/scales")]
                else:
                    stored.append(numpy_helper.from_array(compact(f[key]) if key in "AB" else f[key], name))
        elif t.name in base and base[t.name].dtype == value.dtype and np.array_equal(base[t.name], value):
            entry = {"name": t.name, "kind": "base", "base": t.name}
        elif tensor_digest({"": value}, [""]) in by_content:
            entry = {"name": t.name, "kind": "base", "base": by_content[tensor_digest({"": value}, [""])]}
        else:
            entry = {"name": t.name, "kind": "patch"}
            small = compact(value)
            if small.dtype != value.dtype:
                entry["dtype"] = str(value.dtype)
            stored.append(numpy_helper.from_array(small, t.name))
        entries.append(entry)
    patch = onnx.ModelProto()
    patch.CopyFrom(merged_onnx)
    del patch.graph.initializer[:]
    patch.graph.initializer.extend(stored)
    names = sorted({e["base"] for e in entries if e["kind"] != "patch"})
    floats = [str(base[n].dtype) for n in names if base[n].dtype.kind == "f"]
    rounded = any("blocks" in e for e in entries)  # a plain patch stays readable by v1 appliers
    recipe = {"format": FORMAT if rounded else READS[0], "initializers": entries,
              "base": {**base_info, "sha256": tensor_digest(base, names), "tensors": len(names),
                       "dtype": floats[0] if floats else None}}
    entry = patch.metadata_props.add()
    entry.key, entry.value = RECIPE_KEY, json.dumps(recipe, separators=(",", ":"))
    return patch, recipe


def check_patch(patch, base_onnx, merged_onnx, tolerance: float) -> float:
    """Rebuild the merged model with the device's applier; the largest relative tensor difference to the export.

    Raises ``PatchError`` naming the first tensor that differs by more than ``tolerance``.
    """
    from onnx import numpy_helper

    rebuilt = apply_patch(base_onnx, patch)
    want, got = list(merged_onnx.graph.initializer), list(rebuilt.graph.initializer)
    if [t.name for t in want] != [t.name for t in got] or rebuilt.graph.node != merged_onnx.graph.node:
        raise PatchError("The patched graph differs from the merged export's: report this as a visionpeft bug.")
    worst = 0.0
    for w, g in zip(want, got, strict=True):
        a, b = numpy_helper.to_array(w), numpy_helper.to_array(g)
        if a.dtype != b.dtype or a.shape != b.shape:
            raise PatchError(f"Patched tensor '{w.name}' is {b.dtype}{b.shape}, the export's {a.dtype}{a.shape}.")
        if a.dtype.kind != "f":
            diff = 0.0 if np.array_equal(a, b) else float("inf")
        else:
            scale = max(float(np.abs(a.astype(np.float32)).max(initial=0.0)), 1e-12)
            diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max(initial=0.0)) / scale
        if not diff <= tolerance:
            raise PatchError(f"Patched tensor '{w.name}' differs from the merged export by {diff:.1e} (relative; "
                             f"allowed {tolerance:.0e}): this base or architecture is not supported by patches; "
                             "export the merged ONNX instead.")
        worst = max(worst, diff)
    return worst


def export_patch(options: ExportOptions | None = None, /, base_onnx: str | Path | None = None,
                 **fields) -> PatchResult:
    """Write a patch that turns the base's ONNX export into the adapter's merged ONNX export (fp32 or fp16).

    Options as for ``export`` (an ``ExportOptions`` or its fields as keywords): ``adapter`` with ``base``, or
    ``run``; ``quantize``, ``imgsz``, ``opset``, ``data`` and ``check_names`` as there (format, dynamic and the
    verification settings do not apply). ``base_onnx``: the base file the devices run (default: the plain base
    exported here with the same options, cached; its path is in the result). ``out``: a ``.vpatch`` path or a
    folder (default: beside the adapter, ``<adapter stem>[_fp16].vpatch``).
    """
    from .pipeline import export, resolve_inputs

    o = dataclasses.replace(options or ExportOptions(), **fields)
    quantize, imgsz, opset = o.quantize, o.imgsz, o.opset
    try:
        precision = PRECISIONS[int(quantize)]
    except (KeyError, TypeError, ValueError):
        precision = None
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"Patches are made for fp32 or fp16 base files (quantize 32 or 16), not {quantize!r}: an "
                         "INT8 file keeps 8-bit codes of the folded weights, so the adapter's update cannot be added "
                         "exactly; apply a patch to the fp32 base and quantize the result instead.")
    base, adapter, _, _ = resolve_inputs(o.base, o.adapter, o.run)
    deployed = load_onnx(base_onnx, "base model") if base_onnx is not None else None
    if deployed is not None:
        props = {p.key: p.value for p in deployed.metadata_props}
        imgsz = imgsz if imgsz is not None or "imgsz" not in props else props["imgsz"]  # the devices' input size
        have, want = weight_dtype(deployed), {"fp32": "float32", "fp16": "float16"}[precision]
        if have != want:
            raise ValueError(f"Base ONNX '{base_onnx}' holds {have} weights, a {precision} patch needs a {want} base: "
                             f"pass --quantize {32 if have == 'float32' else 16} (or the {want} base file).")
    with tempfile.TemporaryDirectory(prefix="visionpeft-patch-") as tmp:
        with _quiet():  # its log would name the temporary merged file
            result = export(ExportOptions(base=base, adapter=adapter, run=o.run, quantize=quantize, imgsz=imgsz,
                                          opset=opset, data=o.data, out=Path(tmp), verify=False,
                                          check_names=o.check_names))
        merged_file = result.files[precision]
        merged_onnx = load_onnx(merged_file, "merged export")
        props = {p.key: p.value for p in merged_onnx.metadata_props}
        plain = load_base(base)
        if deployed is None:
            base_file = base_export(plain, [int(v) for v in props["imgsz"].strip("[]").split(",")], opset=opset)
            if precision == "fp16":
                base_file = to_fp16(base_file, base_file.with_name(f"{base_file.stem}_fp16.onnx"))
            base_proto = load_onnx(base_file, "base model")
        else:
            base_file, base_proto = Path(base_onnx), deployed
        adapted = copy.deepcopy(plain)
        load_adapter(adapted, adapter)  # checks the base fingerprint
        factors = conv_factors(adapted, plain, merge(adapted))
        base_props = {p.key: p.value for p in base_proto.metadata_props}
        info = {"model": Path(str(base)).name, "precision": precision, "imgsz": base_props.get("imgsz"),
                "ultralytics": base_props.get("version")}
        patch, recipe = build_patch(base_proto, merged_onnx, factors, info)
        max_rel = check_patch(patch, base_proto, merged_onnx, TOLERANCE[precision])
        merged_size = merged_file.stat().st_size
    out = Path(o.out) if o.out is not None else adapter.parent
    suffix = "_fp16" if precision == "fp16" else ""
    path = out if out.suffix == ".vpatch" else out / f"{adapter.stem}{suffix}.vpatch"
    write_model(patch, path)
    counts = {k: n for k in KINDS if (n := sum(e["kind"] == k for e in recipe["initializers"]))}
    return PatchResult(file=path, size=path.stat().st_size, merged_size=merged_size, base_file=base_file,
                       precision=precision, counts=counts, max_rel=max_rel)
