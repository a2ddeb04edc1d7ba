"""The benchmark on coco8 at 64 px: one process per run, reports written after each run, resume skips done runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from conftest import leaves

import visionpeft as vp
from visionpeft.bench import load_bench_config, run_benchmark
from visionpeft.bench.class_scores import main as class_scores_main
from visionpeft.bench.runner import run_config
from visionpeft.methods.norm_stats import NormStatsAdapter
from visionpeft.train.config import load_config


def test_benchmark_reports_and_resumes(tmp_path, capsys):
    cfg = load_bench_config("bench_smoke.yaml", {"project": str(tmp_path), "only": "full,lora_r4,lora_r4_q4"})
    results = run_benchmark(cfg)
    out = tmp_path / "smoke"
    assert [r["name"] for r in results] == ["full", "lora_r4", "lora_r4_q4"]
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
    # a 4-bit file (peft.file_bits) trains the same run and is scored as shipped, the trained score kept beside it
    by_name = {r["name"]: r for r in results}
    q4 = by_name["lora_r4_q4"]
    assert q4["trained_mAP50-95"] == by_name["lora_r4"]["mAP50-95"] and "trained_mAP50-95" not in by_name["lora_r4"]
    assert 0 <= q4["mAP50-95"] <= 1 and q4["task_file_kb"] < 0.5 * by_name["lora_r4"]["task_file_kb"]
    # time to full fine-tuning's mAP, from the per-epoch validation: full itself gets there at its best epoch
    curves = {r["name"]: r["curve"] for r in results}
    assert len(curves["full"]) == 1 and float(full["time_to_full_s"]) == pytest.approx(curves["full"][0][0])
    assert lora["time_to_full_s"] == "never" or float(lora["time_to_full_s"]) == pytest.approx(curves["lora_r4"][0][0])

    # An interrupted benchmark resumes: finished runs are kept, not run again.
    done = (out / "full" / "weights" / "best.pt").stat().st_mtime_ns
    more = load_bench_config("bench_smoke.yaml", {"project": str(tmp_path), "only": "full,lora_r4,head_only"})
    run_benchmark(more)
    assert (out / "full" / "weights" / "best.pt").stat().st_mtime_ns == done
    assert list(json.loads((out / "results.json").read_text())) == ["full", "lora_r4", "lora_r4_q4", "head_only"]

    # where each run's mAP goes: per-class confidence on true objects and on background (scripts/class_scores.py)
    assert class_scores_main([str(out / "full"), str(out / "lora_r4")]) == 0
    lines = capsys.readouterr().out.splitlines()
    for run in ("full", "lora_r4"):  # one row per class of the run's dataset, from the run's merged model
        rows = [line for line in lines if line.startswith(str(out / run) + " class=")]
        assert len(rows) == len(yaml.safe_load((out / run / "dataset.yaml").read_text())["names"]), lines


def test_class_scores_of_the_pretrained_base_on_coco8(base):
    from visionpeft.bench.class_scores import class_scores, summary

    scores = class_scores(base("yolo11n.pt"), "coco8.yaml", imgsz=640)
    rows = {r["class"]: r for r in summary(scores)}
    assert len(rows) == 80 and sum(r["gt"] for r in rows.values()) == 17  # coco8 val: 4 images, 17 boxes
    person, umbrella, plant = rows["person"], rows["umbrella"], rows["potted plant"]
    assert person["gt"] == 10 and 4 <= person["found_0.25"] <= 7  # big people found, the bus's small ones not
    assert umbrella["gt"] == 1 and umbrella["median_best"] > 0.8  # one large umbrella, found with confidence
    assert plant["gt"] == 1 and plant["found_0.25"] == 0  # a potted plant the base barely sees
    assert all(0 <= s <= 1 for s in scores["person"]["best"] + scores["person"]["background"])
    assert rows["toothbrush"]["gt"] == 0 and rows["toothbrush"]["background_0.25"] == 0


def test_benchmark_config_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown .*'epochz'.*Valid keys"):
        load_bench_config("bench_smoke.yaml", {"epochz": 3})  # not a benchmark key, so an Ultralytics train key
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: coco8_smoke.yaml\nrunz: {full: {kind: full}}\n")
    with pytest.raises(ValueError, match="Unknown benchmark config key.*runz.*Valid keys"):
        load_bench_config(bad)
    with pytest.raises(ValueError, match="no run named"):
        load_bench_config("bench_smoke.yaml", {"only": "full,nope"})


def test_vit_benchmark_trains_the_vit_in_full_or_frozen_beside_another_family(tmp_path):
    """Baselines of a ViT detector (plain Ultralytics training of a ``vitdet:`` model, all of it or with the ViT
    frozen) and a run with its own ``base`` (a YOLO reference) in one table."""
    bench = tmp_path / "vit.yaml"
    bench.write_text("base: vit_smoke.yaml\ntrain: {epochs: 1, imgsz: 64, batch: 2, plots: false, seed: 0}\n"
                     "runs:\n  full: {kind: full}\n  frozen_vit: {kind: freeze, freeze: 1}\n"
                     "  yolo: {base: coco8_smoke.yaml}\n")
    rows = {r["name"]: r for r in run_benchmark(load_bench_config(bench, {"project": str(tmp_path), "name": "v"}))}
    full, frozen, yolo = rows["full"], rows["frozen_vit"], rows["yolo"]
    vit = 5_524_416  # ViT-Ti/16 without its classifier, 64 px position grid (16 positions + class token)
    assert full["total"] - full["trainable"] == 16 and full["total"] > vit  # all but the DFL projection
    assert frozen["total"] == full["total"] and frozen["trainable"] < full["total"] - vit + 1000  # ViT frozen
    assert yolo["kind"] == "peft" and yolo["total"] < 4_000_000  # yolo11n, not the ViT detector
    assert "vitdet" in (tmp_path / "v" / "results.md").read_text()


@pytest.mark.parametrize("name", ["bench_crops.yaml", "bench_crops_sweep.yaml", "bench_smoke.yaml",
                                  "bench_vit_crops.yaml"])
def test_shipped_benchmark_configs_are_valid(name, tmp_path):
    """Every run of the shipped benchmarks builds a valid training config (peft block, methods, train keys)."""
    cfg = load_bench_config(name)
    for run in cfg["runs"]:
        config = load_config(run_config(cfg, run, tmp_path))
        if (cfg["runs"][run] or {}).get("kind", "peft") == "peft":
            assert config.peft.methods, run


@pytest.mark.parametrize("run", ["floor", "floor_stats"])
def test_floor_rows_back_propagate_to_layer_0_without_weight_gradients(run, tmp_path, base, images):
    """The floors bound any method that adapts layer 0: the gradient reaches layer 0's BatchNorm through every layer,
    yet nothing but it and the new class outputs has a weight gradient; ``floor_stats`` also moves every other
    BatchNorm's statistics as crops.yaml does, so it is that recipe's floor."""
    config = load_config(run_config(load_bench_config("bench_crops.yaml"), run, tmp_path))
    model = base("yolo11n.pt")
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) - 1  # layer 0's is trained in full
    vp.inject(model, config.peft.methods, adapter_name="t", names=["crop", "weed"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.0.bn.", "model.23.cv3.")) for n in trained)
    assert any(n.startswith("model.0.bn.") for n in trained)
    stats = [m for m in model.modules() if isinstance(m, NormStatsAdapter)]
    assert len(stats) == (bns if run == "floor_stats" else 0)
    if run == "floor_stats":  # the row repeats crops.yaml's norm_stats entry: it must stay that recipe's floor
        assert [m for m in config.peft.methods if m["method"] == "norm_stats"] == [
            m for m in load_config("crops.yaml").peft.methods if m["method"] == "norm_stats"]
    before = [s.stats.clone() for s in stats]
    model.train()
    sum(t.float().square().mean() for t in leaves(model(images))).backward()
    layer0 = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.0.bn.")]
    assert all(g is not None and g.abs().sum() > 0 for g in layer0)  # back-propagated through every layer
    assert all(not torch.equal(b, s.stats) for b, s in zip(before, stats, strict=True))  # every statistic moved


# The multi-domain benchmark (configs/bench_domains.yaml): one worker run per (domain, method, seed).

DOMAINS_YAML = """\
base: coco8_smoke.yaml
train: {epochs: 1, imgsz: 64, batch: 4, workers: 0, plots: false, optimizer: AdamW, lr0: 0.0005}
seeds: [0, 1]
domains:
  coco8: {data: coco8.yaml}
runs:
  full: {kind: full}
  lora_r4: {peft: {methods: [{method: lora, r: 4, alpha: 8}]}}
"""


def _domains_cfg(tmp_path, text: str = DOMAINS_YAML):
    path = tmp_path / "domains.yaml"
    path.write_text(text)
    return path


def test_domain_benchmark_end_to_end_quick_and_resume(tmp_path, capsys):
    """quick=true runs seed 0 of each (domain, method) in its own folder, reports the ratio to full fine-tuning, and
    the same command skips finished runs; a changed budget is refused before anything runs."""
    from visionpeft.bench.cli import main
    from visionpeft.bench.domains import load_domain_config, out_dir, plan

    cfg_file = _domains_cfg(tmp_path)
    args = ["--cfg", str(cfg_file), f"project={tmp_path}", "name=d", "quick=true"]
    assert main(args) == 0
    out = tmp_path / "d"
    assert f"benchmark results in {out.resolve()}" in capsys.readouterr().out  # the summary names its folder
    for run in ("full_s0", "lora_r4_s0"):
        assert (out / "coco8" / run / "bench_result.json").is_file(), run
        assert (out / "coco8" / run / "weights" / "best.pt").is_file(), run
    assert not (out / "coco8" / "full_s1").exists()  # quick: the first seed only
    rows = {r["method"]: r for r in csv.DictReader((out / "results_domains.csv").open())}
    full, lora = rows["full"], rows["lora_r4"]
    assert float(full["ratio_mean"]) == 1.0 and full["n_ratios"] == "1" and full["seeds"] == "0"
    assert (lora["epochs"], lora["imgsz"], lora["train_images"]) == ("1", "64", "4")
    lora_map = json.loads((out / "coco8" / "lora_r4_s0" / "bench_result.json").read_text())["mAP50-95"]
    full_map = json.loads((out / "coco8" / "full_s0" / "bench_result.json").read_text())["mAP50-95"]
    assert full_map > 0 and lora_map != full_map  # lr0: one step moves them apart, so the ratio is not trivially 1
    assert float(lora["ratio_mean"]) == pytest.approx(lora_map / full_map)
    summary = list(csv.DictReader((out / "summary_domains.csv").open()))
    assert [s["method"] for s in summary] == ["lora_r4"] and summary[0]["worst_domain"] == "coco8"
    assert "| coco8 | 1 ep x 64 px, 4 img | lora_r4 | 0 |" in (out / "results_domains.md").read_text()
    assert (out / "ratio_by_domain.png").stat().st_size > 0

    # Resume: the same command trains nothing; without quick, only seed 1 is left to do.
    done = (out / "coco8" / "full_s0" / "weights" / "best.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "coco8" / "full_s0" / "weights" / "best.pt").stat().st_mtime_ns == done
    cfg = load_domain_config(cfg_file, {"project": str(tmp_path), "name": "d"})
    finished, todo = plan(cfg, out_dir(cfg))
    assert finished == [("coco8", "full", 0), ("coco8", "lora_r4", 0)]
    assert todo == [("coco8", "full", 1), ("coco8", "lora_r4", 1)]

    # Another budget under the same name would mix budgets in one table: refused in one line, nothing retrained.
    capsys.readouterr()
    assert main([*args, "epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "full_s0 finished with another config (train.epochs: 1 -> 2)" in err and "\n" not in err
    assert (out / "coco8" / "full_s0" / "weights" / "best.pt").stat().st_mtime_ns == done


def test_domain_aggregation_ratios_spread_geomean_worst():
    """Per-seed ratios to full fine-tuning of the same seed, their mean and min-max, the geometric mean over domains
    and the worst domain; a method missing a domain is flagged, not averaged over fewer domains silently."""
    from visionpeft.bench.domain_report import aggregate, geometric_mean, markdown, summarize

    def res(domain, method, seed, m, kind="peft"):
        return {"domain": domain, "method": method, "seed": seed, "kind": kind, "mAP50-95": m, "epochs": 6,
                "imgsz": 256, "train_images": 910, "sec_per_epoch": 10.0 + seed, "trainable_pct": 9.8}

    results = [res("a", "full", 0, 0.50, "full"), res("a", "full", 1, 0.40, "full"), res("a", "full", 2, 0.60, "full"),
               res("a", "rec", 0, 0.55), res("a", "rec", 1, 0.36), res("a", "rec", 2, 0.60),
               res("b", "full", 0, 0.20, "full"), res("b", "full", 1, 0.25, "full"),
               res("b", "rec", 0, 0.16), res("b", "rec", 1, 0.20),
               res("b", "other", 0, 0.30)]
    rows = {(r["domain"], r["method"]): r for r in aggregate(results, "full")}
    rec_a = rows["a", "rec"]
    assert rec_a["seeds"] == "0 1 2" and rec_a["n_seeds"] == 3 and rec_a["n_ratios"] == 3
    assert rec_a["map_mean"] == pytest.approx((0.55 + 0.36 + 0.60) / 3)
    assert (rec_a["map_min"], rec_a["map_max"]) == (0.36, 0.60)
    assert rec_a["ratio_mean"] == pytest.approx((1.1 + 0.9 + 1.0) / 3)  # mean of per-seed ratios, not of means
    assert (rec_a["ratio_min"], rec_a["ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.1))
    assert rows["b", "rec"]["ratio_mean"] == pytest.approx(0.8) and rows["a", "full"]["ratio_mean"] == 1.0
    assert rec_a["sec_per_epoch"] == pytest.approx(11.0)

    summary = {s["method"]: s for s in summarize(list(rows.values()), "full", ["a", "b"])}
    assert set(summary) == {"rec", "other"}
    assert summary["rec"]["geomean_ratio"] == pytest.approx((1.0 * 0.8) ** 0.5)
    assert (summary["rec"]["worst_domain"], summary["rec"]["worst_ratio"]) == ("b", pytest.approx(0.8))
    assert summary["rec"]["domains_missing"] == "" and summary["rec"]["n_domains"] == 2
    assert summary["other"]["domains_missing"] == "a" and summary["other"]["geomean_ratio"] == pytest.approx(1.5)
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0) and geometric_mean([1.2, 0.0]) == 0.0
    md = markdown(list(rows.values()), list(summary.values()), "t")
    assert "| a | 6 ep x 256 px, 910 img | rec | 0 1 2 | 0.5033 (0.3600-0.6000) | 1.000 (0.900-1.100) |" in md
    assert "| rec | 2 | 0.894 | b (0.800) |" in md and "| other | 1 (missing: a) | 1.500 | b (1.500) |" in md


@pytest.mark.parametrize(("text", "overrides", "match"), [
    (DOMAINS_YAML + "domainz: {}\n", {}, r"Unknown key\(s\) \['domainz'\].*Valid keys: \['base', 'train'"),
    (DOMAINS_YAML.replace("{data: coco8.yaml}", "{data: coco8.yaml, epochs: 3}"), {},
     r"Unknown key\(s\) \['epochs'\] in domains.coco8. Valid keys: \['data', 'train', 'seeds'\]"),
    (DOMAINS_YAML.replace("{kind: full}", "{kind: full, lr: 2}"), {},
     r"Unknown key\(s\) \['lr'\] in runs.full. Valid keys: \['kind', 'freeze', 'ema_tau', 'peft', 'train'\]"),
    (DOMAINS_YAML.replace("{data: coco8.yaml}", "{data: coco8.yaml, train: {epochz: 3}}"), {},
     r"domains.coco8.train: Unknown Ultralytics train key 'epochz'.*Valid keys"),
    (DOMAINS_YAML, {"epochz": 3}, r"the command line: Unknown Ultralytics train key 'epochz'"),
    (DOMAINS_YAML, {"seed": 3}, r"'seed' in the command line: set seeds with 'seeds:'"),
    (DOMAINS_YAML, {"seeds": []}, r"seeds must be a non-empty list"),
    (DOMAINS_YAML.replace("full: {kind: full}", "full: {kind: freeze, freeze: 10}"), {}, r"no run of kind 'full'"),
    (DOMAINS_YAML.replace("{kind: full}", "{kind: fulll}"), {}, r"kind 'fulll' is not one of"),
    (DOMAINS_YAML, {"only": "full,nope"}, r"only=full,nope: no entry named \['nope'\]. Choose from \['full', 'lora"),
    (DOMAINS_YAML, {"only_domains": "coco9"}, r"no entry named \['coco9'\]"),
    (DOMAINS_YAML.replace("  coco8:", "  ../coco8:"), {}, r"domains: name '../coco8': use letters, digits"),
    (DOMAINS_YAML.replace("coco8.yaml}", "coco9.yaml}"), {}, r"domain coco8, run full: Dataset YAML 'coco9.yaml' not"),
    (DOMAINS_YAML.replace("r: 4, alpha: 8", "r: 4, alph: 8"), {}, r"domain coco8, run lora_r4: .*alph"),
])
def test_domain_config_errors(tmp_path, text, overrides, match):
    from visionpeft.bench.domains import load_domain_config

    with pytest.raises(ValueError, match=match) as info:
        load_domain_config(_domains_cfg(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_only_domains_needs_only_those_datasets(tmp_path):
    """A domain left out by only_domains may name a dataset this machine lacks; run, it is checked like any other."""
    from visionpeft.bench.domains import load_domain_config

    path = _domains_cfg(tmp_path, DOMAINS_YAML.replace("  coco8: {data: coco8.yaml}\n",
                                                       "  coco8: {data: coco8.yaml}\n  far: {data: far_away.yaml}\n"))
    cfg = load_domain_config(path, {"only_domains": "coco8"})
    assert cfg["todo_domains"] == ["coco8"] and list(cfg["domains"]) == ["coco8", "far"]
    with pytest.raises(ValueError, match=r"domain far, run full: Dataset YAML 'far_away.yaml' not"):
        load_domain_config(path)


def test_shipped_domain_benchmark_config(tmp_path):
    """bench_domains.yaml: every YOLO dataset of the assets with train and val, >= 2 seeds (3 on crop_weed), every
    (domain, run) a valid training config; quick mode is the first seed of each."""
    from visionpeft.bench.domains import domain_run_config, load_domain_config, plan

    cfg = load_domain_config("bench_domains.yaml", {"project": str(tmp_path)})
    assert list(cfg["domains"]) == ["crop_weed", "apple_detection", "coco128", "cherry_bbch81"]
    assert cfg["domains"]["crop_weed"]["seeds"] == [0, 1, 2]
    assert all(len(d["seeds"]) >= 2 for d in cfg["domains"].values())
    assert cfg["reference"] == "full" and "recipe" in cfg["runs"]
    config = domain_run_config(cfg, "cherry_bbch81", "recipe", 1, tmp_path)
    assert config["train"]["seed"] == 1 and config["train"]["imgsz"] >= 416 and config["peft"]["lr_mult"] == 3.0
    assert config["train"]["name"] == "recipe_s1" and config["train"]["project"] == str(tmp_path / "cherry_bbch81")
    assert len(plan(cfg, tmp_path)[1]) == len(cfg["runs"]) * (3 + 2 + 2 + 2)
    quick = load_domain_config("bench_domains.yaml", {"project": str(tmp_path), "quick": True, "only": "full,recipe"})
    assert plan(quick, tmp_path)[1][:2] == [("crop_weed", "full", 0), ("crop_weed", "recipe", 0)]
    assert len(plan(quick, tmp_path)[1]) == 8

    # A finished run (its spec as the runner writes it, JSON) counts as done under the same config, so resume works
    # with crops.yaml's nested augmentations; under another budget it is refused.
    folder = tmp_path / "coco128" / "full_s0"
    folder.mkdir(parents=True)
    (folder / "bench_spec.json").write_text(json.dumps({"config": domain_run_config(cfg, "coco128", "full", 0,
                                                                                    tmp_path)}))
    (folder / "bench_result.json").write_text("{}")
    finished, todo = plan(quick, tmp_path)
    assert finished == [("coco128", "full", 0)] and len(todo) == 7
    with pytest.raises(ValueError, match=r"coco128/full_s0 finished with another config \(train.imgsz: 320 -> 64\)"):
        plan(load_domain_config("bench_domains.yaml", {"project": str(tmp_path), "imgsz": 64}), tmp_path)
