"""FP16 and INT8 copies of a float32 YOLO ONNX export, for CPUs and edge accelerators.

FP16 halves the weights and keeps float32 inputs and outputs, so callers feed the same tensors.

INT8 is onnxruntime static quantization (QDQ, per-channel int8 weights, uint8 activations calibrated on real
images), with the graph rewrites of :mod:`.int8_graph` before (decode kept float, faster DFL and upsampling) and
after (Concat inputs sharing the output's scale).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes
from .int8_graph import WEIGHTED_OPS, float_nodes, last_axis_dfl, share_concat_params, upsample_as_concat
from .onnx import telemetry_off


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """A float16 copy of ``src`` with float32 inputs and outputs (what Ultralytics does for CPU FP16 exports)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    return atomic_write_bytes(dst, model.SerializeToString())


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
    upsample_as_concat(model)
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
    share_concat_params(quantized)
    onnx.helper.set_model_props(quantized, metadata)  # quantize_static drops the Ultralytics metadata
    return atomic_write_bytes(dst, quantized.SerializeToString())
