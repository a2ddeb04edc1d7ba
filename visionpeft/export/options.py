"""What ``export`` (and ``export_patch``) take, as one typed object: the CLI builds it from its flags, Python callers
pass it or its fields as keywords. A leaf module, so the pipeline, the edge formats and the patch writer share it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: ``quantize`` value -> precision name (file suffixes, report keys)
PRECISIONS = {32: "fp32", 16: "fp16", 8: "int8"}


@dataclass(frozen=True)
class ExportOptions:
    """An export's inputs and settings; every field is documented on ``visionpeft.export.export``."""

    base: str | Path | None = None  # weights (or a ViT detector spec) the adapter was trained on
    adapter: str | Path | None = None  # adapter .safetensors file
    run: str | Path | None = None  # training run folder (its best adapter, data and imgsz)
    format: str = "onnx"  # onnx, openvino, ncnn
    quantize: int = 32  # 32, 16 or 8
    imgsz: int | list[int] | None = None  # one size or [height, width]; default: the run's, else 640
    dynamic: bool = False  # ONNX: dynamic batch and image size
    opset: int | None = None  # ONNX opset (default: Ultralytics' choice)
    val: bool = False  # also measure mAP50-95 on ``data``
    data: str | Path | None = None  # dataset YAML or name: INT8 calibration, parity images, val
    out: str | Path | None = None  # output folder (or .onnx / .vpatch path); default: beside the adapter
    verify: bool = True  # write the verification report
    calib: int = 128  # INT8 calibration images (train split)
    runs: int = 50  # timed runs per file for the latency median (0: no timing)
    threads: int | None = 1  # runtime threads for latency (None: all cores)
    check_names: bool = True  # refuse ``data`` whose class names differ from the adapter's

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``; a ValueError naming the accepted values otherwise."""
        try:
            return PRECISIONS[int(self.quantize)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"quantize must be 32, 16 or 8, not {self.quantize!r}.") from None
