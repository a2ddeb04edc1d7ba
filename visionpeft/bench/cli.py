"""``visionpeft-benchmark`` / ``python scripts/benchmark.py --cfg bench_crops.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EPILOG = """\
overrides (key=value):
  epochs=30 fraction=0.1 imgsz=320   Ultralytics train arguments for every run
  name=crops_f10 project=runs/benchmark   the output folder (runs/benchmark/<name>/)
  only=full,recipe                   do only these runs
Finished runs are kept: the same command again resumes an interrupted benchmark.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="visionpeft-benchmark", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark PEFT methods against Ultralytics full fine-tuning, freezing and head-only training.")
    parser.add_argument("--cfg", default="bench_crops.yaml", help="benchmark YAML: a path or a name in configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from ..train.config import ConfigError, parse_overrides
    from .runner import load_bench_config, run_benchmark

    try:
        cfg = load_bench_config(args.cfg, parse_overrides(args.overrides))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"visionpeft-benchmark: error: {e}", file=sys.stderr)
        return 2
    run_benchmark(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
