"""The benchmark: every method on the same data, base, image size, epochs and seed, one process per run.

Results are saved after each run (``results.json``), so an interrupted benchmark resumes where it stopped; at the
end (and after each run) it writes ``results.csv``, ``results.md`` and ``map_vs_trainable.png``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from ..io import atomic_write_bytes

COLUMNS = ["name", "kind", "mAP50", "mAP50-95", "vs_full", "trainable", "trainable_pct", "sec_per_epoch",
           "time_vs_full", "time_to_full_s", "peak_rss_mb", "rss_vs_full", "task_file_kb", "file_vs_full", "onnx_kb",
           "onnx_latency_ms"]
BENCH_KEYS = {"base", "train", "runs", "project", "name", "only"}


def load_bench_config(path: str | Path, overrides: dict | None = None) -> dict:
    """A benchmark config (a path, or a name in ``configs/``) with ``key=value`` overrides.

    ``base``: the training config every run starts from (model, data, augmentations, train args; its ``peft:``
    block is the shipped recipe). ``train``: train args for every run. ``runs``: name -> ``{kind, freeze, peft,
    train, base, ema_tau}`` (a run's ``base`` replaces the benchmark's; ``ema_tau`` for a baseline's EMA, as
    ``peft.ema_tau`` sets a PEFT run's). ``project``/``name``: the output folder.
    ``only``: comma-separated run names to do.
    Overrides: benchmark keys, else Ultralytics train keys (``epochs=30 fraction=0.1``).
    """
    from ..train.config import check_train_args, find_config

    cfg = yaml.safe_load(find_config(path).read_text()) or {}
    for k, v in (overrides or {}).items():
        if k in BENCH_KEYS:
            cfg[k] = v
        else:
            cfg.setdefault("train", {})[k] = v
    unknown = sorted(set(cfg) - BENCH_KEYS)
    if unknown:
        raise ValueError(f"Unknown benchmark config key(s) {unknown}. Valid keys: {sorted(BENCH_KEYS)}.")
    cfg["train"] = check_train_args(cfg.get("train") or {})  # unknown Ultralytics keys list the valid ones
    if not cfg.get("runs"):
        raise ValueError("The benchmark config has no 'runs:' section (name -> {kind: full|freeze|peft, ...}).")
    if cfg.get("only"):
        keep = [n.strip() for n in str(cfg["only"]).split(",")]
        missing = sorted(set(keep) - set(cfg["runs"]))
        if missing:
            raise ValueError(f"only={cfg['only']}: no run named {missing}. Runs: {list(cfg['runs'])}.")
        cfg["runs"] = {n: cfg["runs"][n] for n in keep}
    return cfg


def training_config(base: str | Path, train_layers: Sequence[dict | None], out_dir: Path, name: str,
                    data: str | None = None, peft: dict | None = None, extra_augmentations: list | None = None) -> dict:
    """The training config (a dict, as ``visionpeft.train`` takes it) of one benchmark run, in ``out_dir/name``.

    ``base``: the training YAML it starts from; ``data`` replaces its dataset, ``peft`` updates its ``peft:`` block;
    ``train_layers`` update its train args in order (later wins); ``extra_augmentations`` are appended to its
    ``augmentations`` list (a base without one then gets these alone, not Ultralytics' defaults plus these).
    """
    from ..train.config import find_config

    raw = yaml.safe_load(find_config(base).read_text()) or {}
    if data:
        raw["data"] = data
    if peft:
        raw["peft"] = {**(raw.get("peft") or {}), **peft}
    if extra_augmentations:
        raw["augmentations"] = [*(raw.get("augmentations") or []), *extra_augmentations]
    train = dict(raw.get("train") or {})
    for layer in train_layers:
        train.update(layer or {})
    raw["train"] = {**train, "project": str(Path(out_dir).resolve()), "name": name, "exist_ok": True}
    return raw


def run_config(cfg: dict, name: str, out_dir: Path) -> dict:
    """The training config (a dict, as ``visionpeft.train`` takes it) of benchmark run ``name``; a run's own
    ``base`` (e.g. another model family as a reference) replaces the benchmark's, the shared ``train`` args stay."""
    entry = cfg["runs"][name] or {}
    return training_config(entry.get("base") or cfg.get("base", "crops.yaml"), [cfg.get("train"), entry.get("train")],
                           out_dir, name, peft=entry.get("peft"))


def run_spec(name: str, entry: dict | None, config: dict) -> dict:
    """What the worker reads: the run's name, kind (full, freeze, peft), Ultralytics ``freeze``, a baseline's
    ``ema_tau`` and config."""
    entry = entry or {}
    return {"name": name, "kind": entry.get("kind", "peft"), "freeze": entry.get("freeze"),
            "ema_tau": entry.get("ema_tau"), "config": config}


def launch(spec: dict, spec_file: Path, result_file: Path, label: str) -> dict:
    """Run one benchmark run in its own worker process (its peak RSS is its own) and return its result."""
    atomic_write_bytes(spec_file, json.dumps(spec, indent=2).encode())
    proc = subprocess.run([sys.executable, "-m", "visionpeft.bench.worker", str(spec_file), str(result_file)])
    if proc.returncode != 0:
        raise RuntimeError(f"Benchmark run '{label}' failed (exit {proc.returncode}); see its output above. "
                           "Fix it and run the same command again: finished runs are kept.")
    return json.loads(result_file.read_text())


def eta_text(durations: list[float], remaining: int) -> str:
    """``", ETA 12 min for the remaining runs"`` from the durations of the runs done so far."""
    if not durations:
        return ""
    return f", ETA {sum(durations) / len(durations) * remaining / 60:.0f} min for the remaining runs"


def with_ratios(results: list[dict]) -> list[dict]:
    """Each result plus its ratios to the full fine-tuning run of the same benchmark."""
    full = next((r for r in results if r["kind"] == "full"), None)
    out = []
    for r in results:
        r = dict(r)
        for key, ref in [("vs_full", "mAP50-95"), ("time_vs_full", "sec_per_epoch"), ("rss_vs_full", "peak_rss_mb"),
                         ("file_vs_full", "task_file_kb")]:
            r[key] = r[ref] / full[ref] if full and full[ref] else float("nan")
        if full:
            r["file_vs_full"] = r["task_file_kb"] / full["checkpoint_kb"]
            # full fine-tuning's best epoch (its final mAP is that epoch's fp16 checkpoint, rounded differently)
            target = max((v for _, v in full.get("curve") or []), default=full["mAP50-95"])
            r["time_to_full_s"] = time_to_reach(r.get("curve"), target)
        out.append(r)
    return out


def time_to_reach(curve: list | None, target: float) -> float | str:
    """Training seconds until the first epoch whose mAP50-95 reaches ``target`` (full fine-tuning's), what a user
    waits for; ``"never"`` within the budget, ``""`` without per-epoch validation."""
    if not curve:
        return ""
    return next((seconds for seconds, value in curve if value >= target), "never")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_reports(results: list[dict], out_dir: Path, title: str) -> None:
    rows = with_ratios(results)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    plot(rows, out_dir / "map_vs_trainable.png", title)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        full = r["kind"] == "full"
        ax.scatter(r["trainable_pct"], r["mAP50-95"], marker="*" if full else "o", s=180 if full else 50,
                   color="crimson" if full else "tab:blue", zorder=3)
        ax.annotate(r["name"], (r["trainable_pct"], r["mAP50-95"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
        if full:
            ax.axhline(r["mAP50-95"], color="crimson", lw=0.8, ls="--", label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of model, log scale)")
    ax.set_ylabel("val mAP50-95")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if any(r["kind"] == "full" for r in rows):
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_benchmark(cfg: dict, out_dir: str | Path | None = None) -> list[dict]:
    """Run each entry of ``cfg["runs"]`` not yet done in ``out_dir``; returns all results so far."""
    out_dir = Path(out_dir or Path(cfg.get("project", "runs/benchmark")) / cfg.get("name", "crops"))
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "results.json"
    done: dict[str, dict] = json.loads(store.read_text()) if store.exists() else {}
    todo = [n for n in cfg["runs"] if n not in done]
    base = run_config(cfg, todo[0] if todo else next(iter(cfg["runs"])), out_dir)
    title = f"{Path(str(base['data'])).stem}, {Path(str(base['model'])).name}, " + ", ".join(
        f"{k}={v}" for k, v in base["train"].items() if k in {"imgsz", "epochs", "fraction", "seed"})
    if done:
        print(f"benchmark: resuming, {len(done)} run(s) already done: {', '.join(done)}", flush=True)
    durations: list[float] = []
    for i, name in enumerate(todo, 1):
        spec = run_spec(name, cfg["runs"][name], run_config(cfg, name, out_dir))
        print(f"\nbenchmark [{i}/{len(todo)}] {name} ({spec['kind']}){eta_text(durations, len(todo) - i + 1)}",
              flush=True)
        t0 = time.perf_counter()
        done[name] = launch(spec, out_dir / f"{name}.spec.json", out_dir / f"{name}.result.json", name)
        durations.append(time.perf_counter() - t0)
        atomic_write_bytes(store, json.dumps(done, indent=2).encode())
        write_reports(list(done.values()), out_dir, title)
        r = done[name]
        print(f"benchmark: {name}: mAP50-95 {r['mAP50-95']:.4f}, trainable {r['trainable_pct']:.2f}%, "
              f"{r['sec_per_epoch']:.1f} s/epoch, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    results = list(done.values())
    write_reports(results, out_dir, title)
    print(f"\nbenchmark results in {out_dir}:\n{(out_dir / 'results.md').read_text()}")
    return results
