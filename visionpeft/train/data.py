"""Dataset YAMLs: find them by name in the repo's ``datasets/`` folder and point them at the assets location.

The YAMLs in ``datasets/`` say ``path: ${assets}/datasets/<name>``, so one setting (``$VISIONPEFT_ASSETS``, see
:func:`visionpeft.settings.assets_dir`) moves every dataset at once. Ultralytics reads data YAMLs from files only
(``check_det_dataset``), so :func:`resolve_dataset` writes the resolved copy into the run directory, where it also
documents the run and serves ``resume``. Images must exist before Ultralytics sees the YAML: a missing split would
otherwise send it to the YAML's ``download:`` and to Ultralytics' own ``datasets_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .. import settings
from ..io import atomic_write_bytes

DATASETS_DIR = settings.ROOT / "datasets"
PLACEHOLDER = "${assets}"
PATH_KEYS = ("path", "train", "val", "test", "minival")
RESOLVED_NAME = "dataset.yaml"  # the resolved copy in a run directory


def available_datasets() -> list[str]:
    return sorted(p.name for p in DATASETS_DIR.glob("*.y*ml"))


def find_dataset_yaml(data: str | Path) -> Path:
    """A data YAML given as a path, or as a bare name (``crop_weed`` or ``crop_weed.yaml``) in ``datasets/``.

    Bare names never fall through to Ultralytics' own dataset YAMLs, which download their images.
    """
    p = Path(data).expanduser()
    if p.is_file():
        return p.resolve()
    candidates = [p]
    if not p.is_absolute() and p.parent == Path("."):
        names = [p.name] if p.suffix in {".yaml", ".yml"} else [f"{p.name}.yaml", f"{p.name}.yml"]
        candidates += [DATASETS_DIR / n for n in names]
    for c in candidates[1:]:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c.resolve()) for c in candidates)
    raise FileNotFoundError(f"Dataset YAML '{data}' not found (looked in: {looked}). Pass a path to a data YAML, or "
                            f"one of the names in {DATASETS_DIR}: {available_datasets()}.")


def _substitute(value: Any, assets: str, source: Path) -> Any:
    if isinstance(value, list):
        return [_substitute(v, assets, source) for v in value]
    if not isinstance(value, str):
        return value
    rest = value.replace(PLACEHOLDER, "")
    if "${" in rest:
        raise ValueError(f"{source}: unknown placeholder in '{value}'; the only one is {PLACEHOLDER} "
                         f"(the assets location, {settings.ASSETS_ENV}).")
    return value.replace(PLACEHOLDER, assets)


def _dataset_root(data: dict, source: Path) -> Path:
    """The folder Ultralytics resolves ``train``/``val`` against, found the way ``check_det_dataset`` finds it:
    ``path:`` (relative to the working directory, else to Ultralytics' ``datasets_dir``), or the YAML's folder."""
    root = Path(data.get("path") or source.parent).expanduser()
    if not root.exists() and not root.is_absolute():
        from ultralytics.utils import DATASETS_DIR as ULTRALYTICS_DATASETS

        root = ULTRALYTICS_DATASETS / root
    return root


def check_dataset_files(data: dict, source: Path, uses_assets: bool = False) -> None:
    """Raise if the dataset root or its train/val images are missing, naming where it looked."""
    root = _dataset_root(data, source)
    hint = (f"Set {settings.ASSETS_ENV} to the folder holding datasets/ (now: {settings.assets_dir()})"
            if uses_assets else "Fix the paths in the data YAML")
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder '{root}' (from {source}) not found. {hint}.")
    for split in ("train", "val"):
        entries = data.get(split)
        if not entries:
            raise ValueError(f"{source}: the '{split}:' key is missing; a data YAML needs 'train' and 'val'.")
        for entry in entries if isinstance(entries, list) else [entries]:
            if not (root / entry).exists():
                raise FileNotFoundError(f"Dataset '{source.name}': {split} images '{root / entry}' not found. {hint}.")


def load_dataset(data: str | Path) -> tuple[dict, Path]:
    """The data YAML as a dict with ``${assets}`` resolved and its files checked, and where it was found."""
    source = find_dataset_yaml(data)
    raw = yaml.safe_load(source.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source} is not a data YAML (a mapping with path, train, val, names).")
    assets = str(settings.assets_dir())
    resolved = {k: _substitute(v, assets, source) if k in PATH_KEYS else v for k, v in raw.items()}
    check_dataset_files(resolved, source, uses_assets=resolved != raw)
    return resolved, source


def resolve_dataset(data: str | Path, out_dir: str | Path) -> Path:
    """A data YAML file Ultralytics can read: the found file itself, or a resolved copy in ``out_dir``.

    The copy (``out_dir/dataset.yaml``) is written when the YAML uses ``${assets}``; its ``path`` is absolute.
    """
    resolved, source = load_dataset(data)
    raw = yaml.safe_load(source.read_text()) or {}
    if resolved == raw:
        return source
    resolved["path"] = str(_dataset_root(resolved, source).resolve())
    header = f"# Written by visionpeft from {source} with {PLACEHOLDER} = {settings.assets_dir()}\n"
    text = header + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    return atomic_write_bytes(Path(out_dir) / RESOLVED_NAME, text.encode())
