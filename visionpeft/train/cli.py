"""``visionpeft-train`` / ``python scripts/train.py --cfg crops.yaml epochs=3 peft.lr_mult=2``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EPILOG = """\
overrides (key=value, Ultralytics style; they win over the config file):
  epochs=3 imgsz=320 fraction=0.1   any Ultralytics train argument (goes to the train: section)
  model=yolov8n.pt data=coco8.yaml  the base weights and the dataset YAML (names in assets weights/, datasets/)
  peft.lr_mult=2 peft.bn=train      keys of the peft: section; peft.methods.0.r=16 edits the first method
  resume=True                       continue the newest interrupted run of the config (or resume=path/to/last.pt)

The run directory (Ultralytics' runs/detect/<name>) gets Ultralytics' outputs, weights/{best,last}.safetensors
(the adapter), visionpeft.yaml (the effective config) and peft_summary.json.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="visionpeft-train", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train adapters (LoRA, DoRA, bottleneck) on an Ultralytics YOLO base through the Ultralytics "
                    "training pipeline.")
    parser.add_argument("--cfg", help="config YAML: a path, or a name in the repo's configs/ (e.g. crops.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    args = parser.parse_args(argv)

    from .config import ConfigError, load_config, parse_overrides
    from .run import find_last_checkpoint, train

    try:
        overrides = parse_overrides(args.overrides)
        config = load_config(args.cfg, overrides)
        if config.train.get("resume"):
            find_last_checkpoint(config, config.train["resume"])
    except (ConfigError, FileNotFoundError) as e:
        print(f"visionpeft-train: error: {e}", file=sys.stderr)
        return 2
    train(args.cfg, **overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
