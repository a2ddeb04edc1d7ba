#!/usr/bin/env python
"""Benchmark PEFT against full fine-tuning: ``python scripts/benchmark.py --cfg bench_crops.yaml [key=value ...]``."""

from visionpeft.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
