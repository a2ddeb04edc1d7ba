"""The benchmark of PEFT methods against Ultralytics full fine-tuning and freezing."""

from .runner import load_bench_config, run_benchmark

__all__ = ["load_bench_config", "run_benchmark"]
