"""How confident a detector is on each class's true objects, and on the background: where a run's mAP goes.

For every ground-truth box of the val split, its *best score*: the highest score among same-class predictions at
IoU >= 0.5 (0 if none). Every prediction that matches no ground-truth box of its class at IoU >= 0.5 is a
*background* score. Predictions at conf 0.001, as Ultralytics validates. Behind the README's reading of the crops
benchmark ("an under-confident crop class"):

    python scripts/class_scores.py runs/benchmark/amd_full_s0/full runs/benchmark/amd_s0/recipe --imgsz 256
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

IOU = 0.5


def run_model(run_dir: str | Path) -> nn.Module:
    """The model a training run deploys: its best adapter merged into its recorded base, or Ultralytics' best.pt."""
    import visionpeft as vp

    from ..export.pipeline import resolve_inputs

    run_dir = Path(run_dir)
    if (run_dir / "weights" / "best.safetensors").is_file():
        base, adapter, _, _ = resolve_inputs(None, None, run_dir)
        return vp.merge(vp.load_adapter(vp.load_base(base), adapter))
    return vp.load_base(run_dir / "weights" / "best.pt")


def class_scores(model: nn.Module, data: str | Path, imgsz: int, conf: float = 0.001) -> dict[str, dict]:
    """Per class of ``data`` (a data YAML): ``best`` (one score per ground-truth box) and ``background`` scores."""
    from ultralytics.data.utils import img2label_paths
    from ultralytics.utils.metrics import box_iou
    from ultralytics.utils.ops import xywh2xyxy

    import visionpeft as vp

    from ..datasets import load_dataset, resolve_dataset
    from ..export.images import split_images

    with tempfile.TemporaryDirectory(prefix="visionpeft-scores-") as tmp:
        files = split_images(resolve_dataset(data, tmp), "val")
    info = load_dataset(data)[0]
    names = {int(k): v for k, v in info["names"].items()}
    out = {n: {"best": [], "background": []} for n in names.values()}
    detector = vp.YOLO(model)
    for file, label in zip(files, img2label_paths([str(f) for f in files]), strict=True):
        r = detector.predict(str(file), imgsz=imgsz, conf=conf, verbose=False)[0]
        h, w = r.orig_shape
        gt = np.loadtxt(label, ndmin=2) if Path(label).is_file() and Path(label).stat().st_size else np.zeros((0, 5))
        boxes, scores, cls = r.boxes.xyxy.cpu().double(), r.boxes.conf.cpu().numpy(), r.boxes.cls.cpu().numpy()
        gt_boxes = xywh2xyxy(torch.from_numpy(gt[:, 1:5]).double() * torch.tensor([w, h, w, h], dtype=torch.float64))
        iou = box_iou(gt_boxes, boxes).numpy() if len(gt) and len(boxes) else np.zeros((len(gt), len(boxes)))
        for c, name in names.items():
            same = iou[gt[:, 0] == c][:, cls == c]  # this class's ground truth x this class's predictions
            for row in same:
                out[name]["best"].append(float(scores[cls == c][row >= IOU].max()) if (row >= IOU).any() else 0.0)
            matched = same.max(0) >= IOU if len(same) else np.zeros(same.shape[1], bool)
            out[name]["background"].extend(scores[cls == c][~matched].tolist())
    return out


def summary(scores: dict[str, dict], threshold: float = 0.25) -> list[dict]:
    """One row per class: ground-truth count, median and lower quartile of best scores, how many reach
    ``threshold``, and the background's 99th percentile and count at ``threshold``."""
    rows = []
    for name, s in scores.items():
        best, bg = np.asarray(s["best"]), np.asarray(s["background"])
        rows.append({"class": name, "gt": len(best),
                     "median_best": float(np.median(best)) if len(best) else float("nan"),
                     "q25_best": float(np.quantile(best, 0.25)) if len(best) else float("nan"),
                     f"found_{threshold:g}": int((best >= threshold).sum()),
                     "background_p99": float(np.quantile(bg, 0.99)) if len(bg) else 0.0,
                     f"background_{threshold:g}": int((bg >= threshold).sum())})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="training run folders (weights/best.safetensors or weights/best.pt)")
    p.add_argument("--data", help="data YAML (default: each run's dataset.yaml)")
    p.add_argument("--imgsz", type=int, help="image size (default: each run's)")
    p.add_argument("--threshold", type=float, default=0.25, help="score that counts as found (default 0.25)")
    args = p.parse_args(argv)
    for run in map(Path, args.runs):
        run_args = yaml.safe_load((run / "args.yaml").read_text()) if (run / "args.yaml").is_file() else {}
        data, imgsz = args.data or run / "dataset.yaml", args.imgsz or int(run_args.get("imgsz", 640))
        for row in summary(class_scores(run_model(run), data, imgsz), args.threshold):
            print(run, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0
