"""The benchmark of PEFT methods against Ultralytics full fine-tuning and freezing: on one dataset (``runner``), or
on several domains over seeds (``domains``)."""

from .domains import load_domain_config, run_domain_benchmark
from .runner import load_bench_config, run_benchmark

__all__ = ["load_bench_config", "load_domain_config", "run_benchmark", "run_domain_benchmark"]
