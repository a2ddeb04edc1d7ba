"""Export adapters for deployment: merged into their base, to ONNX (FP32, FP16, INT8), verified.

    from visionpeft.export import export
    result = export(run="runs/detect/weeds", quantize=8, imgsz=320, val=True)
    print(result)            # the verification table; result.report (an ExportReport), result.report_file as JSON
"""

from __future__ import annotations

from .int8_graph import float_nodes
from .onnx import base_export, export_onnx, read_metadata
from .options import PRECISIONS, ExportOptions
from .pipeline import export
from .quantize import to_fp16, to_int8
from .report import ExportReport, ExportResult

__all__ = ["PRECISIONS", "ExportOptions", "ExportReport", "ExportResult", "base_export", "export", "export_onnx",
           "float_nodes", "read_metadata", "to_fp16", "to_int8"]
