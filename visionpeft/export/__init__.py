"""Export adapters for deployment: merged into their base, to ONNX (FP32, FP16, INT8), verified.

    from visionpeft.export import export
    result = export(run="runs/detect/weeds", quantize=8, imgsz=320, val=True)
    print(result)            # the verification table; result.report_file holds it as JSON
"""

from __future__ import annotations

from .onnx import base_export, export_onnx, read_metadata
from .pipeline import FORMATS, PRECISIONS, ExportResult, export
from .quantize import float_nodes, to_fp16, to_int8
from .verify import format_table, verify

__all__ = ["FORMATS", "PRECISIONS", "ExportResult", "base_export", "export", "export_onnx", "float_nodes",
           "format_table", "read_metadata", "to_fp16", "to_int8", "verify"]
