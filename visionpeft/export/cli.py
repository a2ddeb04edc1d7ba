"""``visionpeft-export``: an adapter (or a training run) merged into its base, to ONNX, verified.

    visionpeft-export --run runs/detect/weeds --quantize 8 --imgsz 320 --val
    visionpeft-export --base yolo11n.pt --adapter weeds.safetensors --data data.yaml --quantize 16

Exit status: 0 when every verification check passed, 1 when one failed, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..io import AdapterFileError
from .options import ExportOptions


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionpeft-export", description="Merge an adapter into its base, export it to "
                                "ONNX (FP32, FP16 or INT8) and verify the file against the PyTorch model.")
    src = p.add_argument_group("input (an adapter with its base, or a training run folder)")
    src.add_argument("--run", help="training run folder (runs/detect/<name>) holding weights/best.safetensors")
    src.add_argument("--adapter", help="adapter .safetensors file")
    src.add_argument("--base", help="base weights the adapter was trained on (default: the file name recorded in the "
                     "adapter, looked up in the assets' weights/ folder only)")
    p.add_argument("--format", default="onnx",  # others are refused by export() with the reason, in one line
                   help="export format: onnx (default); openvino (32, 16, 8: INT8 via NNCF) and ncnn (32, 16) write "
                   "model folders and need pip install -e \".[edge]\"")
    p.add_argument("--quantize", type=int, default=32, choices=(32, 16, 8),
                   help="precision: 32 (FP32, default), 16 (FP16 weights), 8 (static INT8, needs --data)")
    p.add_argument("--imgsz", type=int, nargs="+", help="image size, or height width (default: the run's, else 640)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and image size")
    p.add_argument("--opset", type=int, help="ONNX opset (default: Ultralytics' choice)")
    p.add_argument("--data", help="dataset data.yaml: INT8 calibration, parity images, --val (default: the run's)")
    p.add_argument("--val", action="store_true", help="also report mAP50-95 of each file and the PyTorch model")
    p.add_argument("--allow-names-mismatch", dest="check_names", action="store_false",
                   help="use --data even if its class names differ from the adapter's (mAP is then meaningless)")
    p.add_argument("--out", help="output folder or .onnx path (default: beside the adapter)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the verification report")
    p.add_argument("--calib", type=int, default=128, help="INT8 calibration images (train split; default 128)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per file for the latency median (default: 50)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for latency (default: 1; 0: all cores)")
    p.add_argument("--patch", action="store_true", help="write a .vpatch instead: what devices holding the base ONNX "
                   "apply to it (python -m visionpeft.edge apply base.onnx x.vpatch) to get the merged ONNX")
    p.add_argument("--base-onnx", help="with --patch: the base ONNX the devices run (default: the base exported here)")
    return p


def options(args: argparse.Namespace) -> ExportOptions:
    """The parsed flags as ``export``'s options (``--threads 0``: all cores)."""
    imgsz = None if not args.imgsz else args.imgsz[0] if len(args.imgsz) == 1 else args.imgsz
    return ExportOptions(base=args.base, adapter=args.adapter, run=args.run, format=args.format,
                         quantize=args.quantize, imgsz=imgsz, dynamic=args.dynamic, opset=args.opset, val=args.val,
                         data=args.data, out=args.out, verify=args.verify, calib=args.calib, runs=args.runs,
                         threads=args.threads or None, check_names=args.check_names)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    if args.patch:
        return _patch(opts, args.base_onnx)
    from .pipeline import export

    try:
        result = export(opts)  # logs the report's table
    except (AdapterFileError, FileNotFoundError, ValueError, TypeError, ImportError) as e:  # ImportError: no [edge]
        print(f"visionpeft-export: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    if not result.ok:
        failed = [k for k, c in result.report.checks.items() if not c.ok]
        print(f"visionpeft-export: verification failed: {', '.join(failed)} (see {result.report_file})",
              file=sys.stderr)
        return 1
    return 0


def _patch(opts: ExportOptions, base_onnx: str | None) -> int:
    from .patch import export_patch

    try:
        print(export_patch(opts, base_onnx=base_onnx))
    except (AdapterFileError, FileNotFoundError, ValueError, TypeError) as e:  # PatchError is a ValueError
        print(f"visionpeft-export: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
