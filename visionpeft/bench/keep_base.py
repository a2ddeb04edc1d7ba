"""The keep-base benchmark: where should the branch leave the base (``keep_base``), measured.

Each run trains as in the main benchmark (one worker process; :mod:`.runner`), then its merged model is measured
here: new-class mAP50-95 on the training dataset's val split, base-class mAP50-95 on ``base_data``'s val split
(PyTorch and ONNX) and on its train split (PyTorch: a second set of images, as many again), ONNX size and
onnxruntime CPU latency against the plain base's ONNX (timed in turn, 1 thread).
A ``from: <run>`` entry trains nothing and measures that run's adapter in keep-base mode (``from: recipe`` with
``keep_base: true`` is the recipe at L = 0: two whole networks; with ``keep_base: single``, one path: the adapted
layers feed the base's class outputs too, what a single path gives before any distillation); a run that trains
with ``keep_base: single`` (e.g. with ``peft.distill_base``) is measured the same way. ``from: <run>`` with
``scale: s`` measures that run's adapter scaled toward the base where the base classes read it
(:func:`visionpeft.scale_adapter`): the trade-off of one training at several points, without training again.
Plain adapters and full fine-tuning replace the base's class outputs: their base-class mAP is 0 by construction.
The untouched base is the reference row.
Results are saved after each run (``results.json``: the same command resumes); reports: :mod:`.keep_base_report`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ..inject import check_scale_pattern
from ..io import atomic_write_bytes
from .keep_base_report import write_keep_reports
from .runner import eta_text, launch, run_spec, training_config

BENCH_KEYS = ["base", "data", "base_data", "peft", "train", "runs", "project", "name", "only", "latency_runs"]
RUN_KEYS = ["kind", "freeze", "peft", "train", "from", "keep_base", "extra_augmentations", "scale", "scale_pattern"]
BASE_ROW = "base"
SINGLE = "single"  # keep_base: single, with from: <plain run>: one path, the base's class outputs beside the adapter's


def load_keep_config(path: str | Path, overrides: dict | None = None) -> dict:
    """A keep-base benchmark config (a path, or a name in ``configs/``) with ``key=value`` overrides (benchmark
    keys, else Ultralytics train keys). ``peft``: updates the base's ``peft:`` block for every run, before a
    run's own ``peft``."""
    from ..train.config import check_train_args, find_config

    cfg = yaml.safe_load(find_config(path).read_text()) or {}
    for k, v in (overrides or {}).items():
        (cfg if k in BENCH_KEYS else cfg.setdefault("train", {}))[k] = v
    unknown = sorted(set(cfg) - set(BENCH_KEYS))
    if unknown:
        raise ValueError(f"Unknown keep-base benchmark key(s) {unknown}. Valid keys: {BENCH_KEYS}.")
    cfg["train"] = check_train_args(cfg.get("train") or {})
    runs = cfg.get("runs") or {}
    if not runs or BASE_ROW in runs:
        raise ValueError(f"The config needs 'runs:' (name -> {{peft: ..., keep_base: ...}}), none named '{BASE_ROW}'.")
    for name, entry in runs.items():
        entry = runs[name] = entry or {}
        bad = sorted(set(entry) - set(RUN_KEYS))
        if bad:
            raise ValueError(f"Unknown key(s) {bad} in run '{name}'. Valid keys: {RUN_KEYS}.")
        if not isinstance(entry.get("extra_augmentations") or [], list):  # checked here, before any run trains
            raise ValueError(f"Run '{name}': extra_augmentations must be a list of transforms, as augmentations: "
                             f"is, not {entry['extra_augmentations']!r}.")
        if ("scale" in entry or "scale_pattern" in entry) and "from" not in entry:
            raise ValueError(f"Run '{name}': scale measures another run's adapter; add from: <that run>.")
        try:  # a bad pattern fails here, before any run trains
            check_scale_pattern(entry.get("scale_pattern", {}))
        except ValueError as e:
            raise ValueError(f"Run '{name}': scale_pattern: {e}") from None
        if "from" in entry and entry["from"] not in list(runs)[:list(runs).index(name)]:
            raise ValueError(f"Run '{name}': from: {entry['from']!r} must name a run listed before it.")
        if entry.get("keep_base") not in (None, True, False, SINGLE) or (
                entry.get("keep_base") == SINGLE and "from" in entry and keeps_base(runs[entry["from"]])):
            raise ValueError(f"Run '{name}': keep_base is true, false or '{SINGLE}' (a plain adapter measured in one "
                             f"path: its own, or that of from: <a run without keep_base>), not "
                             f"{entry.get('keep_base')!r}.")
    if cfg.get("only"):
        keep = [n.strip() for n in str(cfg["only"]).split(",")]
        missing = sorted(set(keep) - set(runs))
        if missing:
            raise ValueError(f"only={cfg['only']}: no run named {missing}. Runs: {list(runs)}.")
        keep += [runs[n]["from"] for n in keep if "from" in runs[n] and runs[n]["from"] not in keep]
        cfg["runs"] = {n: runs[n] for n in runs if n in keep}
    return cfg


def keeps_base(entry: dict) -> bool | str:
    """True (a branch), ``"single"`` (one path: the adapter's layers with the base's class outputs) or False."""
    mode = entry.get("keep_base", (entry.get("peft") or {}).get("keep_base", False))
    return mode if mode == SINGLE else bool(mode)


def _config(cfg: dict, name: str, out_dir: Path) -> dict:
    entry = cfg["runs"][name]
    return training_config(cfg.get("base", "crops.yaml"), [cfg.get("train"), entry.get("train")], out_dir, name,
                           data=cfg.get("data"), peft={**(cfg.get("peft") or {}), **(entry.get("peft") or {})},
                           extra_augmentations=entry.get("extra_augmentations"))


def _model(run_dir: Path, kind: str, base: str, keep: bool | str, scale: float | None = None,
           pattern: dict[str, float] | None = None):
    """The merged model a run deploys: its best adapter (scaled toward the base by ``scale``, module patterns by
    their own factor) merged into the base
    (with the base beside it if ``keep``; the base's class outputs on the adapted path if ``keep`` is
    ``"single"``), or the fine-tuned checkpoint."""
    import visionpeft as vp

    if kind != "peft":
        return vp.load_base(run_dir / "weights" / "best.pt")
    file = run_dir / "weights" / "best.safetensors"
    recorded = vp.read_adapter(file)[1].get("keep_base")  # the mode it trained in; else keep_base: true measures
    model = vp.load_adapter(vp.load_base(base), file, keep_base=None if recorded else keep is True)  # it at L=0
    if scale is not None or pattern:
        vp.scale_adapter(model, 1.0 if scale is None else scale, pattern=pattern)
    if keep == SINGLE:
        from ..families.yolo_keep import single_path_model

        return single_path_model(vp.load_base(base), vp.merge(model))
    return vp.merge(model)


def measure(model, name: str, new_data: Path | None, base_data: Path, base_onnx: Path, imgsz: int, out_dir: Path,
            runs: int, base_train: Path | None = None) -> dict:
    """mAP of the model's new and base classes (PyTorch; ONNX for a model that has both; in PyTorch also on
    ``base_train``, the base dataset's train split as val), ONNX size, latency."""
    from ..class_offset import names_offset, offset_dataset
    from ..datasets import load_dataset
    from ..export.onnx import export_onnx
    from ..export.verify import latency_ms, val_onnx, val_torch

    base_names = load_dataset(base_data)[0]["names"]
    has_base = names_offset(model.names, base_names) == 0
    onnx = base_onnx if name == BASE_ROW else export_onnx(model, out_dir / f"{name}.onnx", imgsz=imgsz)
    row = {"new_map50_95": 0.0, "base_map50_95": 0.0, "base_map50_95_onnx": 0.0,
           **({"base_train_map50_95": 0.0} if base_train else {})}
    if new_data is not None and name != BASE_ROW:
        offset = names_offset(model.names, load_dataset(new_data)[0]["names"]) or 0
        data = offset_dataset(new_data, model.names, offset, out_dir / f"{name}_val")
        row["new_map50_95"] = val_torch(model, data, imgsz)["map50_95"]
    if has_base:
        row["base_map50_95"] = val_torch(model, base_data, imgsz)["map50_95"]
        row["base_map50_95_onnx"] = val_onnx(onnx, base_data)["map50_95"]
        if base_train:  # 128 more images: a point of base-class mAP is within what one set of 128 measures
            row["base_train_map50_95"] = val_torch(model, base_train, imgsz)["map50_95"]
    base_ms, ms = latency_ms([base_onnx, onnx], (imgsz, imgsz), runs=runs, threads=1)
    row.update(onnx_mb=Path(onnx).stat().st_size / 2**20, latency_ms=ms, base_latency_ms=base_ms,
               latency_vs_base=ms / base_ms, layer=getattr(model, "keep_base", {}).get("layer"))
    return row


def run_keep_benchmark(cfg: dict, out_dir: str | Path | None = None) -> dict[str, dict]:
    """Train and measure each run of ``cfg`` not yet done in ``out_dir``; returns every result so far by name."""
    from ..datasets import resolve_dataset, train_split_as_val
    from ..export.onnx import export_onnx
    from ..models import load_base

    out_dir = Path(out_dir or Path(cfg.get("project", "runs/benchmark")) / cfg.get("name", "keep_base")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "results.json"
    done: dict[str, dict] = json.loads(store.read_text()) if store.exists() else {}
    first = _config(cfg, next(iter(cfg["runs"])), out_dir)
    imgsz, weights, runs = int(first["train"].get("imgsz", 640)), str(first["model"]), int(cfg.get("latency_runs", 50))
    new_data = resolve_dataset(first["data"], out_dir / "data_new")
    base_yaml = cfg.get("base_data", "coco128.yaml")
    base_data = resolve_dataset(base_yaml, out_dir / "data_base")
    base_train = train_split_as_val(base_yaml, out_dir / "data_base_train")
    base = load_base(weights)
    base_onnx = out_dir / f"{BASE_ROW}.onnx"
    if not base_onnx.is_file():
        export_onnx(base, base_onnx, imgsz=imgsz)

    def save() -> None:
        if store.exists():  # rows another keep-base command (e.g. only=<another run>) finished meanwhile
            done.update({k: v for k, v in json.loads(store.read_text()).items() if k not in done})
        atomic_write_bytes(store, json.dumps(done, indent=2).encode())
        write_keep_reports(done, out_dir, f"{Path(str(first['data'])).stem} + {Path(base_data).parent.name} base "
                                          f"classes, {Path(weights).name}, imgsz={imgsz}")

    if BASE_ROW not in done or (base_train and "base_train_map50_95" not in done[BASE_ROW]):  # older results too
        done[BASE_ROW] = {"name": BASE_ROW, "kind": "base", **measure(base, BASE_ROW, None, base_data, base_onnx,
                                                                      imgsz, out_dir, runs, base_train)}
        save()
    todo = [n for n in cfg["runs"] if n not in done]
    durations: list[float] = []
    for i, name in enumerate(todo, 1):
        entry = cfg["runs"][name]
        print(f"\nkeep-base benchmark [{i}/{len(todo)}] {name}{eta_text(durations, len(todo) - i + 1)}", flush=True)
        t0 = time.perf_counter()
        source = entry.get("from", name)
        trained = done[source]["training"] if source != name else launch(
            run_spec(name, entry, _config(cfg, name, out_dir)), out_dir / f"{name}.spec.json",
            out_dir / f"{name}.result.json", name)
        model = _model(out_dir / source, trained["kind"], weights, keeps_base(entry), entry.get("scale"),
                       entry.get("scale_pattern"))
        scaled = "scale" in entry or "scale_pattern" in entry
        mode = keeps_base(cfg["runs"][source] if scaled else entry)  # a scaled run: its source's mode
        done[name] = {"name": name, "kind": trained["kind"], "keep_base": mode, "from": source,
                      "scale": entry.get("scale"), "scale_pattern": entry.get("scale_pattern"), "training": trained,
                      **measure(model, name, new_data, base_data, base_onnx, imgsz, out_dir, runs, base_train)}
        durations.append(time.perf_counter() - t0)
        save()
    save()
    print(f"\nkeep-base benchmark results in {out_dir}:\n{(out_dir / 'results.md').read_text()}")
    return done
