"""``visionpeft.train.train(cfg, **overrides)``: one training run from a config, returning its summary.

Used by ``scripts/train.py`` and the benchmark. ``resume=True`` continues the newest interrupted run of the config's
``project``/``name`` (``resume=path/to/last.pt`` a given one); the adapter recipe, augmentations and train args then
come from that checkpoint, as in Ultralytics.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write_bytes
from .config import RunConfig, load_config
from .summary import RunSummary, summarize
from .trainer import PeftDetectionTrainer

CONFIG_NAME = "visionpeft.yaml"  # the effective config, saved in the run directory
# What Ultralytics lets a resumed run change (engine.trainer.BaseTrainer.check_resume).
RESUME_ARGS = {"imgsz", "batch", "device", "close_mosaic", "save_period", "workers", "cache", "patience", "time",
               "val", "plots", "channels_last"}


def run_dir_of(config: RunConfig) -> Path:
    """The run directory Ultralytics would create for this config's ``project``/``name``, without a number."""
    from ultralytics.cfg import get_cfg, get_save_dir

    keep = {k: v for k, v in config.train.items() if k in {"project", "name"}}
    return get_save_dir(get_cfg(overrides={**keep, "exist_ok": True, "mode": "train", "task": "detect"}))


def find_last_checkpoint(config: RunConfig, resume: bool | str | Path) -> Path:
    """``last.pt`` to resume: the given file (or run dir), or the newest ``<name>``/``<name>N`` run of the config."""
    if resume is not True:
        p = Path(resume).expanduser()
        candidates = [p / "weights" / "last.pt", p / "last.pt"] if p.is_dir() else [p]
        for c in candidates:
            if c.is_file():
                return c.resolve()
        raise FileNotFoundError(f"Resume checkpoint '{resume}' not found (looked for: "
                                f"{', '.join(str(c) for c in candidates)}).")
    base = run_dir_of(config)
    pattern = re.compile(re.escape(base.name) + r"\d*")
    found = [d / "weights" / "last.pt" for d in base.parent.glob(f"{base.name}*") if pattern.fullmatch(d.name)]
    found = [f for f in found if f.is_file()]
    if not found:
        raise FileNotFoundError(f"No run to resume: no {base.parent}/{base.name}*/weights/last.pt. Pass "
                                "resume=path/to/last.pt, or the project/name of the interrupted run.")
    return max(found, key=lambda f: f.stat().st_mtime)


def _explicit_resume_args(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides a resumed run may take (``data``, when the dataset moved, and Ultralytics' list)."""
    out, ignored = {}, []
    for key, value in overrides.items():
        key = key.removeprefix("train.")
        if key in RESUME_ARGS or key == "data":
            out[key] = value
        elif key not in {"resume", "project", "name"}:
            ignored.append(key)
    if ignored:
        from ultralytics.utils import LOGGER

        LOGGER.warning(f"visionpeft: resume keeps the interrupted run's settings; ignoring {ignored}. "
                       f"A resumed run may change {sorted(RESUME_ARGS | {'data'})}.")
    return out


def train(cfg: str | Path | Mapping | None = None, callbacks: Mapping[str, Callable | list[Callable]] | None = None,
          **overrides: Any) -> RunSummary:
    """Train the adapters of ``cfg`` (a YAML path or name in ``configs/``, or a dict) with ``overrides``.

    Overrides are as on the command line: ``epochs=3``, ``data="coco8.yaml"``, ``**{"peft.lr_mult": 2}``.
    ``callbacks`` maps Ultralytics callback events to functions of the trainer. Returns the run summary, also
    saved as ``<run dir>/peft_summary.json``.
    """
    config = load_config(cfg, overrides)
    resume = config.train.get("resume")
    if resume:
        last = find_last_checkpoint(config, resume)
        args = _explicit_resume_args(overrides)
        if "data" in args:
            args["data"] = config.data  # found and checked by load_config
        trainer = PeftDetectionTrainer(overrides={"resume": str(last), **args}, peft=None)
    else:
        trainer = PeftDetectionTrainer(overrides=config.trainer_overrides(), peft=config.peft)
        text = yaml.safe_dump({**config.to_dict(), "source": str(config.source) if config.source else None},
                              sort_keys=False)
        atomic_write_bytes(Path(trainer.save_dir) / CONFIG_NAME, text.encode())
    for event, fns in (callbacks or {}).items():
        for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
            trainer.add_callback(event, fn)

    epoch_seconds: list[float] = []
    started: list[float] = []
    trainer.add_callback("on_train_epoch_start", lambda t: started.append(time.perf_counter()))
    trainer.add_callback("on_fit_epoch_end",  # also fired by the final validation, which is no epoch
                         lambda t: epoch_seconds.append(time.perf_counter() - started[-1])
                         if len(epoch_seconds) < len(started) else None)
    _reset_gpu_peak(trainer)
    t0 = time.perf_counter()
    trainer.train()
    summary = summarize(trainer, epoch_seconds, time.perf_counter() - t0)
    summary.save()

    from ultralytics.utils import LOGGER

    LOGGER.info(f"\nvisionpeft summary (saved to {Path(summary.run_dir) / 'peft_summary.json'}):\n{summary.table()}")
    return summary


def _reset_gpu_peak(trainer: PeftDetectionTrainer) -> None:
    import torch

    if trainer.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(trainer.device)
