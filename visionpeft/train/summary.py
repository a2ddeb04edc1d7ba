"""The numbers a PEFT run is judged by, printed as a table and saved as ``<run dir>/peft_summary.json``.

Accuracy (mAP of the best checkpoint, as Ultralytics' final validation reports it) next to cost: trainable
parameters, adapter file size against the full checkpoint, time per epoch, and peak memory.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..datasets import dropped_images
from ..io import atomic_write_bytes

SUMMARY_NAME = "peft_summary.json"
MAP50, MAP50_95 = "metrics/mAP50(B)", "metrics/mAP50-95(B)"


@dataclass
class RunSummary:
    """One training run. Sizes in bytes, memory in MiB, times in seconds; ``None`` where not measured."""

    run_dir: str
    adapter_name: str
    epochs: int  # epochs completed (rows of results.csv)
    best_epoch: int | None  # 1-based
    map50: float | None
    map50_95: float | None
    trainable_params: int
    total_params: int
    trainable_percent: float
    adapter_file: str | None
    adapter_bytes: int | None
    checkpoint_bytes: int | None
    seconds_per_epoch: float | None  # training + validation + checkpointing, epochs run in this process
    train_seconds: float
    peak_rss_mib: float
    peak_gpu_mib: float | None
    device: str
    # images Ultralytics' dataset scan dropped (corrupt image or bad label), {"train": n, "val": n}
    dropped_images: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else Path(self.run_dir) / SUMMARY_NAME
        return atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def table(self) -> str:
        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        ratio = (f" ({self.adapter_bytes / self.checkpoint_bytes:.1%} of the checkpoint)"
                 if self.adapter_bytes and self.checkpoint_bytes else "")
        rows = [
            ("run", self.run_dir),
            ("adapter", f"{self.adapter_name}: {self.adapter_file or '-'}"),
            ("best mAP50", f"{num(self.map50, '.4f')}   (epoch {num(self.best_epoch, 'd')} of {self.epochs})"),
            ("best mAP50-95", num(self.map50_95, ".4f")),
            ("trainable params", f"{self.trainable_params:,} of {self.total_params:,} "
                                 f"({self.trainable_percent:.2f}%)"),
            ("adapter file", f"{num(self.adapter_bytes and self.adapter_bytes / 2**20, '.2f')} MiB{ratio}"),
            ("full checkpoint", f"{num(self.checkpoint_bytes and self.checkpoint_bytes / 2**20, '.2f')} MiB"),
            ("time per epoch", f"{num(self.seconds_per_epoch, '.1f')} s   (total {self.train_seconds:.1f} s)"),
            ("peak memory", f"{self.peak_rss_mib:,.0f} MiB RSS"
                            + (f", {self.peak_gpu_mib:,.0f} MiB GPU" if self.peak_gpu_mib is not None else "")),
            ("device", self.device),
        ]
        if self.dropped_images and any(self.dropped_images.values()):
            counts = ", ".join(f"{split} {n}" for split, n in self.dropped_images.items())
            rows.append(("dropped images", f"{counts}   (corrupt images or bad labels: see the dataset scan "
                                           "warnings above)"))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


class EpochTimer:
    """Seconds per epoch of a training run, measured once for every report that states them (run summaries and the
    benchmark), from the same Ultralytics callbacks.

    ``train``: ``on_train_epoch_start`` to ``on_train_epoch_end``, the training pass alone (the benchmark's
    ``sec_per_epoch``: validation costs the same for every method). ``epoch``: to ``on_fit_epoch_end``, training,
    validation and checkpointing (the summary's ``seconds_per_epoch``); the final validation fires that callback
    too, but is no epoch.
    """

    def __init__(self) -> None:
        self.started: list[float] = []
        self.train: list[float] = []
        self.epoch: list[float] = []

    def attach(self, trainer) -> EpochTimer:
        trainer.add_callback("on_train_epoch_start", self._epoch_start)
        trainer.add_callback("on_train_epoch_end", self._train_end)
        trainer.add_callback("on_fit_epoch_end", self._epoch_end)
        return self

    def _epoch_start(self, trainer) -> None:
        self.started.append(time.perf_counter())

    def _train_end(self, trainer) -> None:
        self.train.append(time.perf_counter() - self.started[-1])

    def _epoch_end(self, trainer) -> None:
        if len(self.epoch) < len(self.started):
            self.epoch.append(time.perf_counter() - self.started[-1])


def peak_rss_mib() -> float:
    """Peak resident memory of this process (dataloader workers not included)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def summarize(trainer, epoch_seconds: list[float], train_seconds: float) -> RunSummary:
    """The summary of a finished :class:`~visionpeft.train.trainer.PeftDetectionTrainer` run."""
    import torch

    metrics = trainer.metrics or {}
    rows = trainer.read_results_csv() if trainer.csv.exists() else {}
    epochs = len(next(iter(rows.values()), [])) if rows else 0
    map50, map50_95 = metrics.get(MAP50), metrics.get(MAP50_95)
    if map50 is None and rows.get(MAP50):  # no final validation: the best epoch of results.csv
        i = max(range(epochs), key=lambda j: 0.1 * rows[MAP50][j] + 0.9 * rows[MAP50_95][j])
        map50, map50_95 = rows[MAP50][i], rows[MAP50_95][i]
    best_epoch = getattr(getattr(trainer, "stopper", None), "best_epoch", None)  # none in a DDP launcher
    wdir = Path(trainer.wdir)
    adapter = next((p for p in (wdir / "best.safetensors", wdir / "last.safetensors") if p.is_file()), None)
    ckpt = wdir / ("best.pt" if adapter is not None and adapter.stem == "best" else "last.pt")
    report = trainer.trainable
    device = trainer.device
    loaders = {"train": getattr(trainer, "train_loader", None), "val": getattr(trainer, "test_loader", None)}
    dropped = {split: dropped_images(loader.dataset) for split, loader in loaders.items() if loader is not None}
    peak_gpu = (torch.cuda.max_memory_allocated(device) / 2**20
                if device.type == "cuda" and torch.cuda.is_available() else None)
    return RunSummary(
        run_dir=str(trainer.save_dir),
        adapter_name=trainer.peft.adapter_name,
        epochs=epochs,
        best_epoch=int(best_epoch) if best_epoch else None,  # EarlyStopping counts from 1
        map50=None if map50 is None else float(map50),
        map50_95=None if map50_95 is None else float(map50_95),
        trainable_params=report.trainable if report else 0,
        total_params=report.total if report else 0,
        trainable_percent=report.percent if report else 0.0,
        adapter_file=None if adapter is None else str(adapter),
        adapter_bytes=None if adapter is None else _size(adapter),
        checkpoint_bytes=_size(ckpt),
        seconds_per_epoch=sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        train_seconds=train_seconds,
        peak_rss_mib=peak_rss_mib(),
        peak_gpu_mib=peak_gpu,
        device=str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        dropped_images={split: n for split, n in dropped.items() if n is not None} or None,
    )
