#!/usr/bin/env python
"""Export an adapter merged into its base to ONNX (FP32/FP16/INT8) and verify it; same as ``visionpeft-export``.

    python scripts/export.py --run runs/detect/weeds --quantize 8 --imgsz 320 --val
"""

import sys

from visionpeft.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
