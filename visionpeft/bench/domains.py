"""The multi-domain benchmark: every method of ``runs:`` on every dataset of ``domains:``, over seeds.

Each (domain, method, seed) is one worker process in ``<project>/<name>/<domain>/<method>_s<seed>/``; its result
(``bench_result.json``) is written when it finishes, so the same command resumes an interrupted benchmark. A finished
run is reused only if its config is the one the command asks for, else the command stops before training anything.
Reports (:mod:`.domain_report`) are rewritten after every run. ``quick=true`` runs the first seed of each domain.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

from .domain_report import write_domain_reports
from .runner import eta_text, launch, run_spec, training_config

BENCH_KEYS = ["base", "train", "seeds", "domains", "runs", "project", "name", "only", "only_domains", "quick"]
DOMAIN_KEYS = ["data", "train", "seeds"]
RUN_KEYS = ["kind", "freeze", "ema_tau", "peft", "train"]
KINDS = ["full", "freeze", "peft"]
SPEC, RESULT = "bench_spec.json", "bench_result.json"


def _check_name(where: str, name) -> None:
    """Domain and run names become folder names (``<domain>/<method>_s<seed>``): plain ones only."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"{where} name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder).")


def _check_keys(where: str, given: Mapping, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {valid}.")


def _mapping(where: str, value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping ({what}), not {value!r}.")
    return dict(value)


def _seeds(where: str, value) -> list[int]:
    seeds = [value] if isinstance(value, int) else value
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"{where} must be a non-empty list of seeds (integers >= 0), e.g. [0, 1], not {value!r}.")
    return seeds


def _select(key: str, value, names: list[str]) -> list[str]:
    if not value:
        return list(names)
    keep = [n.strip() for n in str(value).split(",") if n.strip()]
    missing = [n for n in keep if n not in names]
    if missing:
        raise ValueError(f"{key}={value}: no entry named {missing}. Choose from {names}.")
    return keep


def load_domain_config(path: str | Path, overrides: Mapping | None = None) -> dict:
    """A multi-domain benchmark config (a path, or a name in ``configs/``) with ``key=value`` overrides, checked in
    full (every domain x run builds a valid training config) before anything runs.

    Keys: ``base`` (the training YAML every run starts from; its ``peft:`` block is the recipe), ``train`` (train
    args for every run), ``seeds`` (default seeds), ``domains`` (name -> ``{data, train, seeds}``), ``runs`` (name ->
    ``{kind, freeze, peft, train}``, one of kind ``full``: the reference), ``project``/``name`` (output folder),
    ``only``/``only_domains`` (comma-separated names to run), ``quick`` (first seed only). Overrides of other keys
    are Ultralytics train args for every run and win over every section (``epochs=1 fraction=0.1``).
    Train args win in the order: ``base`` < ``train`` < domain < run < command line.
    """
    from ..train.config import ConfigError, build_config, check_train_args, find_config

    source = find_config(path)
    raw = yaml.safe_load(source.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must be a mapping with keys {BENCH_KEYS}.")
    cli_train = {}
    for k, v in (overrides or {}).items():
        if k in BENCH_KEYS:
            raw[k] = v
        else:
            cli_train[k] = v
    _check_keys(str(source), raw, BENCH_KEYS)
    cfg = {"base": raw.get("base", "crops.yaml"), "project": raw.get("project", "runs/benchmark"),
           "name": str(raw.get("name", "domains")), "quick": bool(raw.get("quick", False)), "source": str(source)}
    trains = {"train": raw.get("train"), "the command line": cli_train}
    cfg["seeds"] = _seeds("seeds", raw.get("seeds", [0]))

    cfg["runs"] = _mapping("runs", raw.get("runs"), "method name -> {kind, freeze, peft, train}")
    if not cfg["runs"]:
        raise ValueError(f"{source} has no 'runs:' (method name -> {{kind: full|freeze|peft, peft, train}}).")
    for name, entry in cfg["runs"].items():
        _check_name("runs:", name)
        entry = cfg["runs"][name] = _mapping(f"runs.{name}", entry, f"keys {RUN_KEYS}")
        _check_keys(f"runs.{name}", entry, RUN_KEYS)
        if entry.get("kind", "peft") not in KINDS:
            raise ValueError(f"runs.{name}: kind '{entry['kind']}' is not one of {KINDS}.")
        trains[f"runs.{name}.train"] = entry.get("train")
    full = [n for n, e in cfg["runs"].items() if e.get("kind") == "full"]
    if not full:
        raise ValueError(f"{source}: no run of kind 'full' in runs:, so no reference for the ratios; add "
                         "'full: {kind: full}'.")
    cfg["reference"] = full[0]

    cfg["domains"] = _mapping("domains", raw.get("domains"), "domain name -> {data, train, seeds}")
    if not cfg["domains"]:
        raise ValueError(f"{source} has no 'domains:' (domain name -> {{data: <data YAML>, train: {{...}}}}).")
    for name, entry in cfg["domains"].items():
        _check_name("domains:", name)
        entry = cfg["domains"][name] = _mapping(f"domains.{name}", entry, f"keys {DOMAIN_KEYS}")
        _check_keys(f"domains.{name}", entry, DOMAIN_KEYS)
        if not entry.get("data"):
            raise ValueError(f"domains.{name} has no 'data:' (a data YAML, e.g. data: crop_weed.yaml).")
        entry["seeds"] = _seeds(f"domains.{name}.seeds", entry.get("seeds", cfg["seeds"]))
        trains[f"domains.{name}.train"] = entry.get("train")
    for where, train in trains.items():
        train = _mapping(where, train, "Ultralytics train arguments")
        if "seed" in train:
            raise ValueError(f"'seed' in {where}: set seeds with 'seeds:' (or seeds=[0,1]), per domain or for all.")
        try:
            check_train_args(train)  # unknown Ultralytics keys list the valid ones
        except ConfigError as e:
            raise ValueError(f"{where}: {e}") from e
    cfg["train"], cfg["cli_train"] = dict(raw.get("train") or {}), cli_train

    cfg["todo_runs"] = _select("only", raw.get("only"), list(cfg["runs"]))
    cfg["todo_domains"] = _select("only_domains", raw.get("only_domains"), list(cfg["domains"]))
    out = out_dir(cfg)
    # the domains this command runs, not every domain: a team holding some of the datasets runs those
    for domain in cfg["todo_domains"]:
        for method in cfg["runs"]:
            try:  # peft block, augmentations, train values, data and weights files
                build_config(domain_run_config(cfg, domain, method, cfg["domains"][domain]["seeds"][0], out))
            except (ConfigError, ValueError, FileNotFoundError) as e:
                raise ValueError(f"domain {domain}, run {method}: {e}") from e
    return cfg


def out_dir(cfg: dict) -> Path:
    return Path(cfg["project"]) / cfg["name"]


def run_dir(out: Path, domain: str, method: str, seed: int) -> Path:
    return out / domain / f"{method}_s{seed}"


def domain_run_config(cfg: dict, domain: str, method: str, seed: int, out: Path) -> dict:
    """The training config of one (domain, method, seed) run; its adapter is named after the domain."""
    d, entry = cfg["domains"][domain], cfg["runs"][method]
    peft = {**(entry.get("peft") or {}), "adapter_name": domain}
    layers = [cfg["train"], d.get("train"), entry.get("train"), cfg["cli_train"], {"seed": seed}]
    return training_config(cfg["base"], layers, out / domain, f"{method}_s{seed}", data=d["data"], peft=peft)


def _comparable(config: dict) -> dict:
    """A run's config as its JSON spec file holds it (string keys, lists), without where it was written (moving
    the output folder keeps finished runs valid)."""
    config = json.loads(json.dumps(config))
    config["train"].pop("project", None)
    return config


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def plan(cfg: dict, out: Path) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(finished, to do): every (domain, method, seed) of the config with a result on disk, and those this command
    runs, seed-major (the first seed of every domain first, so a partial benchmark is a quick one).

    Raises ``ConfigError`` if a finished run used another config than the one asked for now (reusing it would mix
    budgets).
    """
    from ..train.config import ConfigError

    finished, todo = [], []
    most = max(len(d["seeds"]) for d in cfg["domains"].values())
    seed_count = 1 if cfg["quick"] else most
    for i in range(most):
        for domain, d in cfg["domains"].items():
            if i >= len(d["seeds"]):
                continue
            for method in cfg["runs"]:
                key = (domain, method, d["seeds"][i])
                folder = run_dir(out, *key)
                if (folder / RESULT).is_file() and (folder / SPEC).is_file():
                    spec = json.loads((folder / SPEC).read_text())
                    diff = _differences(_comparable(spec["config"]),
                                        _comparable(domain_run_config(cfg, *key, out)))
                    if diff:
                        raise ConfigError(f"{folder} finished with another config ({'; '.join(diff[:3])}). Use another "
                                         "name=, or move that folder away to run it again.")
                    finished.append(key)
                elif i < seed_count and domain in cfg["todo_domains"] and method in cfg["todo_runs"]:
                    todo.append(key)
    return finished, todo


def collect(out: Path, keys: list[tuple[str, str, int]]) -> list[dict]:
    """The finished runs' results, each tagged with its domain, method and seed."""
    results = []
    for domain, method, seed in keys:
        r = json.loads((run_dir(out, domain, method, seed) / RESULT).read_text())
        results.append({**r, "domain": domain, "method": method, "seed": seed})
    return results


def run_domain_benchmark(cfg: dict) -> list[dict]:
    """Run every (domain, method, seed) not yet finished; returns the table's rows (see :mod:`.domain_report`)."""
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    finished, todo = plan(cfg, out)
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in cfg["domains"] for m in cfg["runs"])}
    model = Path(str(training_config(cfg["base"], [], out, "-").get("model") or "yolo11n.pt")).name

    def report() -> list[dict]:
        keys = sorted(finished, key=lambda k: (order[k[0], k[1]], k[2]))
        return write_domain_reports(collect(out, keys), cfg["reference"], list(cfg["domains"]), out, model)[0]

    if finished:
        print(f"benchmark: resuming, {len(finished)} run(s) already finished in {out}", flush=True)
    durations: list[float] = []
    for i, (domain, method, seed) in enumerate(todo, 1):
        label = f"{domain}/{method}_s{seed}"
        spec = run_spec(method, cfg["runs"][method], domain_run_config(cfg, domain, method, seed, out))
        print(f"\nbenchmark [{i}/{len(todo)}] {label} ({spec['kind']}){eta_text(durations, len(todo) - i + 1)}",
              flush=True)
        folder = run_dir(out, domain, method, seed)
        t0 = time.perf_counter()
        r = launch(spec, folder / SPEC, folder / RESULT, label)
        durations.append(time.perf_counter() - t0)
        finished.append((domain, method, seed))
        report()
        print(f"benchmark: {label}: mAP50-95 {r['mAP50-95']:.4f}, {r['epochs']} epochs x {r['imgsz']} px, "
              f"{r['train_images']} images, {r['wall_s'] / 60:.1f} min", flush=True)
    rows = report() if finished else []
    if finished:
        print(f"\nbenchmark results in {out}:\n{(out / 'results_domains.md').read_text()}")
    return rows
