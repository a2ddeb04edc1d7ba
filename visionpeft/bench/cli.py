"""``visionpeft-benchmark`` / ``python scripts/benchmark.py --cfg bench_crops.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..train.cli import OneLineParser, usage_error

EPILOG = """\
overrides (key=value):
  epochs=30 fraction=0.1 imgsz=320   Ultralytics train arguments for every run
  name=crops_f10 project=runs/benchmark   the output folder (runs/benchmark/<name>/)
  only=full,recipe                   do only these runs
multi-domain configs (with domains:, e.g. --cfg bench_domains.yaml) also take:
  quick=true                         the first seed of each domain only
  only_domains=coco128,cherry_bbch81 do only these domains
keep-base configs (with base_data:, e.g. --cfg bench_keep_base.yaml) take only= and latency_runs=50
Finished runs are kept: the same command again resumes an interrupted benchmark.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="visionpeft-benchmark", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark PEFT methods against Ultralytics full fine-tuning, freezing and head-only training.")
    parser.add_argument("--cfg", default="bench_crops.yaml", help="benchmark YAML: a path or a name in configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    import yaml

    from ..train.config import ConfigError, find_config, parse_overrides
    from .domains import load_domain_config, run_domain_benchmark
    from .keep_base import load_keep_config, run_keep_benchmark
    from .runner import load_bench_config, run_benchmark

    try:
        raw = yaml.safe_load(find_config(args.cfg).read_text())
        load, run = load_bench_config, run_benchmark  # the one-dataset runner, unless the config says otherwise
        if isinstance(raw, dict) and "domains" in raw:
            load, run = load_domain_config, run_domain_benchmark
        elif isinstance(raw, dict) and "base_data" in raw:  # bench_keep_base.yaml
            load, run = load_keep_config, run_keep_benchmark
        cfg = load(args.cfg, parse_overrides(args.overrides))
    except (ConfigError, ValueError, FileNotFoundError, yaml.YAMLError) as e:
        return usage_error(parser.prog, e)
    try:
        run(cfg)
    except ConfigError as e:  # a finished run of another config in the output folder: nothing ran, nothing lost
        return usage_error(parser.prog, e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
