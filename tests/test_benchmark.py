"""The benchmark on coco8 at 64 px: one process per run, reports written after each run, resume skips done runs."""

from __future__ import annotations

import csv
import json

import pytest

from visionpeft.bench import load_bench_config, run_benchmark
from visionpeft.bench.runner import run_config
from visionpeft.train.config import load_config


def test_benchmark_reports_and_resumes(tmp_path):
    cfg = load_bench_config("bench_smoke.yaml", {"project": str(tmp_path), "only": "full,lora_r4"})
    results = run_benchmark(cfg)
    out = tmp_path / "smoke"
    assert [r["name"] for r in results] == ["full", "lora_r4"]
    for name in ("results.json", "results.csv", "results.md", "map_vs_trainable.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    full, lora = rows["full"], rows["lora_r4"]
    assert float(full["vs_full"]) == 1.0 and float(full["trainable_pct"]) > 99
    assert 0 < float(lora["trainable_pct"]) < 10
    assert float(lora["file_vs_full"]) < 0.2  # the adapter file against the full fine-tuned checkpoint
    for r in (full, lora):
        assert 0 <= float(r["mAP50-95"]) <= 1 and float(r["sec_per_epoch"]) > 0 and float(r["peak_rss_mb"]) > 100
        assert float(r["onnx_kb"]) > 1000 and float(r["onnx_latency_ms"]) > 0
    assert "| lora_r4 | peft |" in (out / "results.md").read_text()

    # An interrupted benchmark resumes: finished runs are kept, not run again.
    done = (out / "full" / "weights" / "best.pt").stat().st_mtime_ns
    more = load_bench_config("bench_smoke.yaml", {"project": str(tmp_path), "only": "full,lora_r4,head_only"})
    run_benchmark(more)
    assert (out / "full" / "weights" / "best.pt").stat().st_mtime_ns == done
    assert list(json.loads((out / "results.json").read_text())) == ["full", "lora_r4", "head_only"]


def test_benchmark_config_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown .*'epochz'.*Valid keys"):
        load_bench_config("bench_smoke.yaml", {"epochz": 3})  # not a benchmark key, so an Ultralytics train key
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: coco8_smoke.yaml\nrunz: {full: {kind: full}}\n")
    with pytest.raises(ValueError, match="Unknown benchmark config key.*runz.*Valid keys"):
        load_bench_config(bad)
    with pytest.raises(ValueError, match="no run named"):
        load_bench_config("bench_smoke.yaml", {"only": "full,nope"})


@pytest.mark.parametrize("name", ["bench_crops.yaml", "bench_crops_sweep.yaml", "bench_smoke.yaml"])
def test_shipped_benchmark_configs_are_valid(name, tmp_path):
    """Every run of the shipped benchmarks builds a valid training config (peft block, methods, train keys)."""
    cfg = load_bench_config(name)
    for run in cfg["runs"]:
        config = load_config(run_config(cfg, run, tmp_path))
        if (cfg["runs"][run] or {}).get("kind", "peft") == "peft":
            assert config.peft.methods, run
