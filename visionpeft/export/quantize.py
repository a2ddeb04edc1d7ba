"""FP16 and INT8 copies of a float32 YOLO ONNX export, for CPUs and edge accelerators.

FP16 halves the weights and keeps float32 inputs and outputs, so callers feed the same tensors.

INT8 is onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on real
images). The plain recipe destroys YOLO: the head's output concatenates box pixels (0..imgsz) with class
probabilities (0..1), and one int8 scale for that tensor rounds every score to zero (mAP50-95 0.34 -> 0.00,
onnxruntime issues #14233, #10787). So the box and score *decode* stays float: every node after the head's last
convolutions (the DFL softmax and projection, the anchor/stride arithmetic, the class sigmoid, the concats), found
from the graph rather than by name. The first convolution also stays float: it sees the raw image, gains little
from int8 (three input channels) and is where input rounding hurts most.
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


def _is_dfl(node, initializers: dict) -> bool:
    """The DFL projection: a fixed 1x1 conv with weights 0, 1, ..., reg_max - 1 (expected value of a softmax)."""
    if node.op_type != "Conv":
        return False
    if "dfl" in node.name.lower():
        return True
    w = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or len(w.dims) != 4 or w.dims[0] != 1:
        return False
    from onnx import numpy_helper

    values = numpy_helper.to_array(w).reshape(-1)
    return bool(np.array_equal(values, np.arange(values.size, dtype=values.dtype)))


def float_nodes(model, keep_first_conv: bool = True) -> list[str]:
    """Names of the nodes INT8 must leave in float: the decode tail (and the convs reading the image).

    The tail is every node from which no weighted op (conv, matmul; the DFL projection does not count) can be
    reached: what runs after the head's last convolutions.
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
            per_channel: bool = True) -> Path:
    """A static INT8 (QDQ) copy of ``src``, calibrated on ``calibration`` (preprocessed ``(1, 3, h, w)`` images).

    uint8 activations and int8 weights are onnxruntime's recommendation for x86 CPUs with VNNI (and work on ARM);
    onnxruntime fuses the QDQ pairs into integer kernels (QLinearConv, QLinearMul, ...) at load time.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("INT8 calibration needs at least one image.")
    telemetry_off()  # calibration runs onnxruntime sessions
    model = onnx.load(str(src))
    reader = _reader(model.graph.input[0].name, calibration)
    exclude = float_nodes(model, keep_first_conv)
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
            calibrate_method=CalibrationMethod.MinMax,
            # MinMax keeps every intermediate tensor of every image until it computes the ranges: a few images at a
            # time keep memory flat (CalibMaxIntermediateOutputs would drop data in onnxruntime 1.32)
            extra_options={"CalibStridedMinMax": _stride(len(calibration))},
        )
        quantized = onnx.load(str(Path(tmp) / dst.name))
    onnx.helper.set_model_props(quantized, metadata)  # quantize_static drops the Ultralytics metadata
    return atomic_write_bytes(dst, quantized.SerializeToString())
