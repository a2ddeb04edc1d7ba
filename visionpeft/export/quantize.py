"""FP16 and INT8 copies of a float32 YOLO ONNX export, for CPUs and edge accelerators.

FP16 halves the weights and keeps float32 inputs and outputs, so callers feed the same tensors.

INT8 is onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on real
images). The plain recipe destroys YOLO: the head's output concatenates box pixels (0..imgsz) with class
probabilities (0..1), and one int8 scale for that tensor rounds every score to zero (mAP50-95 0.34 -> 0.00,
onnxruntime issues #14233, #10787). So the box and score *decode* stays float: every node after the head's last
convolutions (the DFL softmax and projection, the anchor/stride arithmetic, the class sigmoid, the concats), found
from the graph rather than by name. So do the convolutions that feed only the decode (the box and class logits),
whose int8 rounding moves scores and box edges for little speed. The first convolution also stays float: it sees
the raw image, gains little from int8 (three input channels) and is where input rounding hurts most.

Before quantizing, the DFL decode is rewritten to compute the same numbers faster (``last_axis_dfl``): Ultralytics'
graph takes the softmax over axis 1 of a ``(1, 16, 4, anchors)`` tensor and projects it with a 1x1 conv; onnxruntime
runs a softmax over a non-last axis as transpose + softmax + transpose, and the conv through NCHWc reorders. Taking
the softmax over the last axis and projecting with a ``(16, 1)`` MatMul gives bit-identical outputs at ~10 % less
time for the whole model on 2 CPU threads (measured in ``scripts/bench_edge.py``); it runs in float like the rest of
the decode.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .onnx import telemetry_off

#: ops whose weights make them worth quantizing; the decode tail is what no such op follows
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """A float16 copy of ``src`` with float32 inputs and outputs (what Ultralytics does for CPU FP16 exports)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    return atomic_write_bytes(dst, model.SerializeToString())


def _projection(node, initializers: dict) -> np.ndarray | None:
    """The weights of a DFL projection node, or None: a 1x1 conv with one output (or, after ``last_axis_dfl``, a
    ``(reg_max, 1)`` MatMul) whose weights are 0, 1, ..., reg_max - 1 (the expected value of a softmax)."""
    w = initializers.get(node.input[1]) if node.op_type in ("Conv", "MatMul") and len(node.input) > 1 else None
    if w is None or not ((len(w.dims) == 4 and w.dims[0] == 1) if node.op_type == "Conv" else
                         (len(w.dims) == 2 and w.dims[1] == 1)):
        return None
    from onnx import numpy_helper

    values = numpy_helper.to_array(w).reshape(-1)
    return values if np.array_equal(values, np.arange(values.size, dtype=values.dtype)) else None


def _is_dfl(node, initializers: dict) -> bool:
    """The DFL projection (by Ultralytics' node name or by its weights), which is decode, not a layer to quantize."""
    return (node.op_type == "Conv" and "dfl" in node.name.lower()) or _projection(node, initializers) is not None


def last_axis_dfl(model) -> int:
    """Rewrite Ultralytics' DFL decode in place to take its softmax over the last axis; the number of DFLs rewritten.

    Mirrors ``ultralytics.nn.modules.block.DFL.forward`` as exported: ``Reshape (b, 4, c1, a) -> Transpose(0, 2, 1,
    3) -> Softmax(axis=1) -> Conv 1x1 (weights 0..c1-1) -> Reshape (b, 4, a)``. It becomes ``Transpose(0, 1, 3, 2)
    -> Softmax(axis=-1) -> MatMul (c1, 1)``, whose ``(b, 4, a, 1)`` output the same Reshape takes: the same sums in the
    same order. Graphs without that pattern are left as they are.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    initializers = {t.name: t for t in graph.initializer}
    done = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        transpose, after = producer.get(softmax.input[0]), consumers.get(softmax.output[0], [])
        if transpose is None or transpose.op_type != "Transpose" or len(after) != 1:
            continue
        conv = after[0]
        attrs = {a.name: helper.get_attribute_value(a) for n in (transpose, softmax) for a in n.attribute}
        if (conv.op_type != "Conv" or len(conv.input) != 2 or _projection(conv, initializers) is None
                or list(attrs.get("perm", [])) != [0, 2, 1, 3] or attrs.get("axis") != 1
                or len(consumers.get(transpose.output[0], [])) != 1):
            continue
        weight = numpy_helper.to_array(initializers[conv.input[1]]).reshape(-1, 1)
        projection = numpy_helper.from_array(weight, f"{conv.input[1]}/last_axis")
        graph.initializer.append(projection)
        del transpose.attribute[:], softmax.attribute[:], conv.attribute[:]
        transpose.attribute.append(helper.make_attribute("perm", [0, 1, 3, 2]))
        softmax.attribute.append(helper.make_attribute("axis", -1))
        old_weight = conv.input[1]
        conv.op_type, conv.name, conv.input[1] = "MatMul", f"{conv.name}/last_axis", projection.name
        if not any(old_weight in n.input for n in graph.node):
            graph.initializer.remove(initializers[old_weight])
        stale = {transpose.output[0], softmax.output[0], conv.output[0]}  # shapes changed: let inference redo them
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        done += 1
    return done


def float_nodes(model, keep_first_conv: bool = True, keep_output_convs: bool = True) -> list[str]:
    """Names of the nodes INT8 must leave in float: the decode tail, the head's output convs and the convs reading
    the image.

    The tail is every node from which no weighted op (conv, matmul; the DFL projection does not count) can be
    reached: what runs after the head's last convolutions. Those output convs (box and class logits: six 1x1 convs
    in YOLO11n) feed only the tail; in int8 they round the logits that the decode turns into scores and box edges
    (320 px, mAP50-95 drop with them in int8 -> in float: crops recipe 0.43 -> 0.15 points on crop_weed val, plain
    yolo11n 0.49 -> 0.65 on coco128).
    """
    graph = model.graph
    unnamed = [n for n in graph.node if not n.name]
    if unnamed:
        raise ValueError(f"The ONNX graph has {len(unnamed)} unnamed nodes; INT8 needs node names to keep the "
                         "decode in float. Export it with visionpeft.export (Ultralytics names every node).")
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS and not _is_dfl(n, initializers)]
    upstream: set[str] = set()
    stack = [t for n in weighted for t in n.input if t in producer]
    while stack:
        node = producer[stack.pop()]
        if node.name not in upstream:
            upstream.add(node.name)
            stack += [t for t in node.input if t in producer]
    weighted_names = {n.name for n in weighted}
    keep = [n.name for n in graph.node if n.name not in upstream and n.name not in weighted_names]
    if keep_output_convs:
        tail = set(keep)
        consumers: dict[str, list[str]] = {}
        for n in graph.node:
            for t in n.input:
                consumers.setdefault(t, []).append(n.name)
        keep += [n.name for n in weighted if n.name not in tail
                 and all(c in tail for o in n.output for c in consumers.get(o, []))]
    if keep_first_conv:
        inputs = {i.name for i in graph.input}
        keep += [n.name for n in weighted if n.input and n.input[0] in inputs]
    return keep


def _reader(input_name: str, batches: Sequence[np.ndarray]):
    """An onnxruntime calibration reader over preprocessed image batches, readable in ranges (strided MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.feeds = iter([{input_name: b} for b in batches[start_index:end_index]])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    return Images()


def _stride(n: int, most: int = 8) -> int:
    """The largest divisor of ``n`` up to ``most``: images calibrated per chunk (onnxruntime needs a divisor)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


@contextlib.contextmanager
def _without_preprocess_hint():
    """onnxruntime logs a pre-processing hint on the root logger at every call; shape inference adds nothing here."""
    hint = logging.Filter()
    hint.filter = lambda record: "pre-process" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def to_int8(src: str | Path, dst: str | Path, calibration: Sequence[np.ndarray], keep_first_conv: bool = True,
            per_channel: bool = True, keep_output_convs: bool = True) -> Path:
    """A static INT8 (QDQ) copy of ``src``, calibrated on ``calibration`` (preprocessed ``(1, 3, h, w)`` images).

    uint8 activations and int8 weights are onnxruntime's recommendation for x86 CPUs with VNNI (and work on ARM);
    onnxruntime fuses the QDQ pairs into integer kernels (QLinearConv, QLinearMul, ...) at load time. In a
    transformer (a graph with LayerNormalization) only the weighted ops (linears, attention products, convs) run in
    int8: LayerNorm, softmax, GELU and residual adds stay float, since ViT activations have outlier channels that one
    per-tensor scale crushes (ViT-Ti crops detector, 224 px: mAP50-95 drop 22.7 points with every op in int8, 1.5
    with the weighted ops only).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("INT8 calibration needs at least one image.")
    telemetry_off()  # calibration runs onnxruntime sessions
    model = onnx.load(str(src))
    last_axis_dfl(model)
    reader = _reader(model.graph.input[0].name, calibration)
    exclude = float_nodes(model, keep_first_conv, keep_output_convs)
    transformer = any(n.op_type == "LayerNormalization" for n in model.graph.node)
    metadata = {p.key: p.value for p in model.metadata_props}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}.") as tmp, _without_preprocess_hint():
        quantize_static(
            model, Path(tmp) / dst.name, reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            op_types_to_quantize=sorted(WEIGHTED_OPS) if transformer else None,  # None: every op onnxruntime can
            calibrate_method=CalibrationMethod.MinMax,
            # MinMax keeps every intermediate tensor of every image until it computes the ranges: a few images at a
            # time keep memory flat (CalibMaxIntermediateOutputs would drop data in onnxruntime 1.32)
            extra_options={"CalibStridedMinMax": _stride(len(calibration))},
        )
        quantized = onnx.load(str(Path(tmp) / dst.name))
    onnx.helper.set_model_props(quantized, metadata)  # quantize_static drops the Ultralytics metadata
    return atomic_write_bytes(dst, quantized.SerializeToString())
