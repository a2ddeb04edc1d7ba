"""``visionpeft.train.train(cfg, **overrides)``: one training run from a config, returning its summary.

Used by ``scripts/train.py`` and the benchmark. ``resume=True`` continues the newest interrupted run of the config's
``project``/``name`` (``resume=path/to/last.pt`` a given one); the adapter recipe, augmentations and train args then
come from that checkpoint, as in Ultralytics.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..integrations.ultralytics import RESUME_ARGS  # what Ultralytics lets a resumed run change
from ..io import atomic_write_bytes
from .config import RunConfig, load_config
from .summary import EpochTimer, RunSummary, summarize
from .trainer import PeftDetectionTrainer

CONFIG_NAME = "visionpeft.yaml"  # the effective config, saved in the run directory


def run_dir_of(config: RunConfig) -> Path:
    """The run directory Ultralytics would create for this config's ``project``/``name``, without a number."""
    from ultralytics.cfg import get_cfg, get_save_dir

    keep = {k: v for k, v in config.train.items() if k in {"project", "name"}}
    return get_save_dir(get_cfg(overrides={**keep, "exist_ok": True, "mode": "train", "task": "detect"}))


def run_name_pattern(name: str) -> re.Pattern:
    """The folder names Ultralytics gives runs of ``name``: ``name`` and its numbered repeats. The numbering is
    learnt from ``ultralytics.utils.files.increment_path`` itself (``name-2`` in Ultralytics 8.4, ``name2`` in
    older releases), in a scratch folder."""
    import tempfile

    from ultralytics.utils.files import increment_path

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run").mkdir()
        second = increment_path(Path(tmp) / "run").name  # what a second run of "run" is called
    sep = re.fullmatch(r"run(\D*)\d+", second)
    if sep is None:
        raise RuntimeError(f"Unexpected Ultralytics run numbering: a second run of 'run' is called '{second}'.")
    return re.compile(re.escape(name) + f"(?:{re.escape(sep.group(1))}\\d+)?")


def find_last_checkpoint(config: RunConfig, resume: bool | str | Path) -> Path:
    """``last.pt`` to resume: the given file (or run dir), or the newest run of the config's name (``<name>``,
    or a numbered repeat such as ``<name>-2``)."""
    if resume is not True:
        p = Path(resume).expanduser()
        candidates = [p / "weights" / "last.pt", p / "last.pt"] if p.is_dir() else [p]
        for c in candidates:
            if c.is_file():
                return c.resolve()
        raise FileNotFoundError(f"Resume checkpoint '{resume}' not found (looked for: "
                                f"{', '.join(str(c) for c in candidates)}).")
    base = run_dir_of(config)
    pattern = run_name_pattern(base.name)
    runs = [d for d in base.parent.iterdir() if pattern.fullmatch(d.name)] if base.parent.is_dir() else []
    found = [f for f in (d / "weights" / "last.pt" for d in runs) if f.is_file()]
    if not found:
        raise FileNotFoundError(f"No run to resume: no {base.parent}/{base.name}*/weights/last.pt. Pass "
                                "resume=path/to/last.pt, or the project/name of the interrupted run.")
    return max(found, key=lambda f: f.stat().st_mtime)


def previous_settings(last: Path) -> dict[str, Any]:
    """The interrupted run's settings, from its run folder's YAML files (never from the pickled checkpoint):
    Ultralytics' ``args.yaml`` (train args) and visionpeft's ``visionpeft.yaml`` (sections, as in a config)."""
    run = last.parent.parent if last.parent.name == "weights" else last.parent
    out: dict[str, Any] = {}
    for name, key in (("args.yaml", "train"), (CONFIG_NAME, None)):
        try:
            loaded = yaml.safe_load((run / name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            out.update({key: loaded} if key else {k: v for k, v in loaded.items() if k != "train"})
    return out


def _lookup(tree: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            raise KeyError(part)
    return tree


def _explicit_resume_args(overrides: Mapping[str, Any], config: RunConfig, previous: Mapping[str, Any]
                          ) -> dict[str, Any]:
    """The overrides a resumed run takes (``data``, when the dataset moved, and Ultralytics' list); a warning for
    the others when they differ from the interrupted run's (``config``: the effective config of this call)."""
    out, ignored = {}, []
    now = {**config.to_dict(), "train": {**config.train}}
    for key, value in overrides.items():
        key = key.removeprefix("train.")
        if key in RESUME_ARGS or key == "data":
            out[key] = value
            continue
        if key.startswith("augmentations."):  # an edit of one transform: the whole (checked) list goes
            out["augmentations"] = None
            continue
        if key in {"resume", "project", "name"}:
            continue
        path = key.split(".") if "." in key or key in now else ["train", key]
        try:
            same = _lookup(now, path) == _lookup(previous, path)
        except KeyError:
            same = False
        if not same:
            ignored.append(key)
    if ignored:
        from ultralytics.utils import LOGGER

        LOGGER.warning(f"visionpeft: resume keeps the interrupted run's settings; ignoring {ignored}, which differ "
                       f"from that run's. A resumed run may change {sorted(RESUME_ARGS | {'data'})}.")
    return out


def _moved_run_args(run: Path, previous: Mapping[str, Any], data_given: bool) -> dict[str, Any]:
    """Continue in the folder the checkpoint is in (the checkpoint names the folder it was written to), and read
    the run's copy of its dataset YAML there if the folder moved since."""
    args: dict[str, Any] = {"save_dir": str(run)}
    old_run, data = previous.get("save_dir"), previous.get("data")
    if not data_given and old_run and data and Path(old_run) != run and Path(data).is_relative_to(old_run):
        args["data"] = str(run / Path(data).relative_to(old_run))
    return args


_TARGETS_CHECKED: set[str] = set()  # configs checked in this process (the CLI checks before it calls train())


def check_adapter_targets(config: RunConfig) -> None:
    """Inject the config's adapters into its base once, as the trainer's ``get_model`` will, so that a base that
    cannot be built or targets that match no module (``peft.methods.0.layers=99``) fail before Ultralytics makes
    the run folder. Costs one base load (under a second for yolo11n.pt), once per config and process."""
    from ..datasets import load_dataset
    from ..models import load_base

    key = json.dumps([str(config.model), str(config.data), config.peft.to_dict()], sort_keys=True, default=str)
    if key in _TARGETS_CHECKED:
        return
    data = load_dataset(config.data)[0]
    names = data.get("names") or [f"class_{i}" for i in range(int(data["nc"]))]
    base = load_base(config.model, nc=len(names))
    config.peft.inject(base, names)  # keep_base: also a new class named like a base class
    _TARGETS_CHECKED.add(key)


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
        previous = previous_settings(last)
        args = _explicit_resume_args(overrides, config, previous)
        if "data" in args:
            args["data"] = config.data  # found and checked by load_config
        if "augmentations" in args:  # as Ultralytics takes them (A.to_dict dicts)
            args["augmentations"] = config.trainer_overrides().get("augmentations")
        if last.parent.name == "weights":
            args.update(_moved_run_args(last.parent.parent, previous.get("train", {}), "data" in args))
        trainer = PeftDetectionTrainer(overrides={"resume": str(last), **args}, peft=None)
    else:
        check_adapter_targets(config)
        trainer = PeftDetectionTrainer(overrides=config.trainer_overrides(), peft=config.peft)
        text = yaml.safe_dump({**config.to_dict(), "source": str(config.source) if config.source else None},
                              sort_keys=False)
        atomic_write_bytes(Path(trainer.save_dir) / CONFIG_NAME, text.encode())
    from ultralytics.utils import LOGGER as _log

    _log.info(f"visionpeft: run folder {Path(trainer.save_dir).resolve()}")  # before any epoch, wherever it is
    for event, fns in (callbacks or {}).items():
        for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
            trainer.add_callback(event, fn)

    timer = EpochTimer().attach(trainer)
    _reset_gpu_peak(trainer)
    t0 = time.perf_counter()
    trainer.train()
    summary = summarize(trainer, timer.epoch, time.perf_counter() - t0)
    summary.save()

    from ultralytics.utils import LOGGER

    LOGGER.info(f"\nvisionpeft summary (saved to {Path(summary.run_dir) / 'peft_summary.json'}):\n{summary.table()}")
    return summary


def _reset_gpu_peak(trainer: PeftDetectionTrainer) -> None:
    import torch

    if trainer.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(trainer.device)
