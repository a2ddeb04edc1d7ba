"""One benchmark run, in its own process (so its peak memory is its own): train, validate, export, measure.

``python -m visionpeft.bench.worker SPEC.json RESULT.json``. The spec holds a training config (as a dict: model,
data, augmentations, train args, and for PEFT runs the ``peft:`` block) and a ``kind``: ``full`` (plain Ultralytics
fine-tuning), ``freeze`` (plain Ultralytics with ``freeze=<n or list>``) or ``peft`` (visionpeft's trainer).
Baselines and PEFT runs share everything but the model's trainable part.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def build_trainer(spec: dict):
    """The trainer of a run: ``PeftDetectionTrainer`` for PEFT, Ultralytics' ``DetectionTrainer`` for baselines
    (:class:`~visionpeft.train.baseline.BaselineDetectionTrainer`, which also builds ViT detectors)."""
    from ..train.baseline import BaselineDetectionTrainer
    from ..train.config import load_config
    from ..train.trainer import PeftDetectionTrainer

    config = load_config(spec["config"])
    overrides = config.trainer_overrides()
    kind = spec["kind"]
    if kind == "peft":
        return PeftDetectionTrainer(overrides=overrides, peft=config.peft)
    if kind not in {"full", "freeze"}:
        raise ValueError(f"Unknown benchmark run kind '{kind}': use full, freeze or peft.")
    return BaselineDetectionTrainer(overrides={**overrides, "freeze": spec.get("freeze")},
                                    ema_tau=spec.get("ema_tau"))


def run_one(spec: dict) -> dict:
    from ultralytics import YOLO

    import visionpeft  # noqa: F401  (offline switches before Ultralytics)

    from ..export.verify import latency_ms
    from ..fonts import ensure_fonts
    from ..inject import trainable_report
    from ..train.summary import EpochTimer, peak_rss_mib

    ensure_fonts()
    trainer = build_trainer(spec)
    timer = EpochTimer().attach(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak_rss = peak_rss_mib()  # before the export below adds its own

    model = trainer.model
    peft = spec["kind"] == "peft"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = trainable_report(model).total if peft else sum(p.numel() for p in model.parameters())
    wdir = Path(trainer.wdir)
    best_pt = wdir / "best.pt"
    task_file = wdir / "best.safetensors" if peft else best_pt  # what a team stores per task
    imgsz = int(trainer.args.imgsz)
    onnx = YOLO(str(best_pt)).export(format="onnx", imgsz=imgsz, verbose=False)  # fuse() merges adapters first
    m = trainer.metrics or {}
    args = trainer.args
    trained = {k: float(m.get(f"metrics/{k}(B)", float("nan"))) for k in ("mAP50", "mAP50-95")}
    shipped = rounded_file_metrics(spec, trainer, task_file) if peft else None
    return {
        **learning_curve(trainer, timer.train),
        # a file of rounded factors (peft.file_bits) is scored as shipped; Ultralytics' validation, the trained one
        **({f"trained_{k}": v for k, v in trained.items()} if shipped else {}),
        "name": spec["name"],
        "kind": spec["kind"],
        # the budget this run actually had (images after ``fraction``), so a table can state it
        "epochs": int(args.epochs),
        "imgsz": imgsz,
        "fraction": float(args.fraction),
        "seed": int(args.seed),
        "train_images": len(trainer.train_loader.dataset),
        **(shipped or trained),
        "trainable": int(trainable),
        "total": int(total),
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "sec_per_epoch": float(np.mean(timer.train)) if timer.train else float("nan"),  # training only
        "wall_s": wall,
        "peak_rss_mb": peak_rss,
        "task_file_kb": task_file.stat().st_size / 1024,
        "checkpoint_kb": best_pt.stat().st_size / 1024,
        "onnx_kb": Path(onnx).stat().st_size / 1024,
        "onnx_latency_ms": latency_ms([onnx], (imgsz, imgsz))[0],  # onnxruntime CPU, 1 thread, median
    }


def rounded_file_metrics(spec: dict, trainer, task_file: Path) -> dict | None:
    """mAP of the adapter file as a team ships it, if it stores block-rounded factors (``peft.file_bits``), by the
    validation Ultralytics ran on the trained weights (its val loader: twice the batch, rect); else ``None``."""
    import tempfile

    from ..io import ROUNDED_KEY, read_adapter
    from ..yolo_model import YOLO

    if ROUNDED_KEY not in read_adapter(task_file)[1]:
        return None
    args = trainer.args
    with tempfile.TemporaryDirectory() as tmp:
        r = YOLO(spec["config"]["model"], adapters=[task_file]).val(
            data=args.data, imgsz=int(args.imgsz), batch=2 * int(args.batch), device=args.device, workers=0,
            plots=False, verbose=False, project=tmp, name="val")
    return {"mAP50": float(r.box.map50), "mAP50-95": float(r.box.map)}


def learning_curve(trainer, train_seconds: list[float]) -> dict:
    """``curve``: per validated epoch, training seconds so far (validation not counted) and mAP50-95, from
    ``results.csv``; empty when validation was off during training (only the last epoch has a mAP then)."""
    rows = trainer.read_results_csv() if trainer.csv.exists() else {}
    maps = rows.get("metrics/mAP50-95(B)", [])
    if not trainer.args.val or len(maps) != len(train_seconds):
        return {"curve": []}
    return {"curve": [[float(t), float(v)] for t, v in zip(np.cumsum(train_seconds), maps, strict=True)]}


def main(argv: list[str] | None = None) -> None:
    from ..io import atomic_write_bytes

    spec_path, out_path = (argv or sys.argv[1:])[:2]
    result = run_one(json.loads(Path(spec_path).read_text()))
    atomic_write_bytes(out_path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
