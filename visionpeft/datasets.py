"""Dataset YAMLs: find them by name in the repo's ``datasets/`` folder and point them at the assets location.

Shared by training, validation (``visionpeft.YOLO``) and export, so none of them imports another to read a dataset.

The YAMLs in ``datasets/`` say ``path: ${assets}/datasets/<name>``, so one setting (``$VISIONPEFT_ASSETS``, see
:func:`visionpeft.settings.assets_dir`) moves every dataset at once. Ultralytics reads data YAMLs from files only
(``check_det_dataset``), so :func:`resolve_dataset` writes the resolved copy into the run directory, where it also
documents the run and serves ``resume``. Images must exist before Ultralytics sees the YAML: a missing split would
otherwise send it to the YAML's ``download:`` and to Ultralytics' own ``datasets_dir``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import yaml

from . import settings
from .io import atomic_write_bytes
from .paths import find_file

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
    return find_file(data, DATASETS_DIR, "Dataset YAML", lambda: "Pass a path to a data YAML, or one of the names in "
                     f"{DATASETS_DIR}: {available_datasets()}.", suffixes=(".yaml", ".yml"))


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


def image_files(entry: Path) -> list[str]:
    """The images Ultralytics reads for one ``train:``/``val:`` entry: a folder (searched recursively) or a text
    file listing image paths (``./`` relative to it). Mirrors ``ultralytics.data.base.BaseDataset.get_img_files``."""
    from ultralytics.data.utils import IMG_FORMATS

    if entry.is_dir():
        found = glob.glob(str(Path(glob.escape(entry)) / "**" / "*.*"), recursive=True)
    else:
        try:
            lines = entry.read_text(encoding="utf-8-sig").strip().splitlines()
        except UnicodeDecodeError:
            lines = []  # an image or other binary file: Ultralytics expects a folder or a text list here
        parent = str(entry.parent) + os.sep
        found = [x.replace("./", parent, 1) if x.startswith("./") else x for x in lines]
    return sorted(x for x in found if x.rpartition(".")[-1].lower() in IMG_FORMATS)


def check_dataset_files(data: dict, source: Path, uses_assets: bool = False) -> None:
    """Raise if the dataset root, its train/val images or all train labels are missing, naming where it looked.

    Ultralytics would fail on these only after making the run folder, with a long traceback.
    """
    from ultralytics.data.utils import IMG_FORMATS, img2label_paths

    root = _dataset_root(data, source)
    hint = (f"Set {settings.ASSETS_ENV} to the folder holding datasets/ (now: {settings.assets_dir()})"
            if uses_assets else "Fix the paths in the data YAML")
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder '{root}' (from {source}) not found. {hint}.")
    if data.get("names") is None and data.get("nc") is None:
        raise ValueError(f"{source}: the 'names:' key is missing; list the class names, e.g. names: {{0: crop, 1: "
                         "weed}.")
    for split in ("train", "val"):
        entries = data.get(split)
        if not entries:
            raise ValueError(f"{source}: the '{split}:' key is missing; a data YAML needs 'train' and 'val'.")
        images = []
        for entry in entries if isinstance(entries, list) else [entries]:
            path = root / entry
            if not path.exists():
                raise FileNotFoundError(f"Dataset '{source.name}': {split} images '{path}' not found. {hint}.")
            found = image_files(path)
            if not found:
                what = "folder" if path.is_dir() else "list"
                raise FileNotFoundError(
                    f"Dataset '{source.name}': the {split} images {what} '{path}' holds no images "
                    f"({', '.join(sorted(IMG_FORMATS))}). Put the {split} images there, or point '{split}:' in "
                    f"{source} at the folder that holds them.")
            images += found
        # Ultralytics refuses a train split without a single label file (a val split only warns)
        if split == "train" and not any(os.path.isfile(f) for f in img2label_paths(images)):
            raise FileNotFoundError(
                f"Dataset '{source.name}': none of the {len(images)} train images has a label file (for "
                f"'{images[0]}' that is '{img2label_paths(images[:1])[0]}'). Put one YOLO .txt file per image in a "
                "'labels' folder beside 'images' (images/a.jpg -> labels/a.txt).")


def dropped_images(dataset: Any) -> int | None:
    """How many images of an Ultralytics YOLO dataset its label scan dropped (corrupt image or bad label).

    Ultralytics only logs them (its ``.cache`` file counts them, but loading it would unpickle a file a user may
    have placed): the images its folders hold, picked as ``BaseDataset.get_img_files`` picks them (sorted, then
    ``fraction``), minus the ones it kept (``im_files``, rewritten by ``YOLODataset.get_labels``). ``None`` for
    a dataset of another kind.
    """
    img_path, kept = getattr(dataset, "img_path", None), getattr(dataset, "im_files", None)
    if img_path is None or kept is None:
        return None
    found = sorted(x.replace("/", os.sep) for p in (img_path if isinstance(img_path, list) else [img_path])
                   for x in image_files(Path(p)))
    fraction = getattr(dataset, "fraction", 1.0)
    count = fraction if isinstance(fraction, int) else max(1, round(len(found) * fraction))
    return len(set(found[:count]) - set(kept))


def load_dataset(data: str | Path) -> tuple[dict, Path]:
    """The data YAML as a dict with ``${assets}`` resolved and its files checked, and where it was found."""
    source = find_dataset_yaml(data)
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not a valid data YAML: {' '.join(str(e).split())}") from None
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
    return _write_resolved(resolved, source, out_dir, f"with {PLACEHOLDER} = {settings.assets_dir()}")


def train_split_as_val(data: str | Path, out_dir: str | Path) -> Path | None:
    """A data YAML in ``out_dir`` whose val split is ``data``'s train split (a second set of images to score a
    model on), or None when ``data`` has no train split other than its val split."""
    resolved, source = load_dataset(data)
    if not resolved.get("train") or resolved.get("train") == resolved.get("val"):
        return None
    return _write_resolved({**resolved, "val": resolved["train"]}, source, out_dir, "with its train split as val")


def _write_resolved(resolved: dict, source: Path, out_dir: str | Path, how: str) -> Path:
    """``out_dir/dataset.yaml``: ``resolved`` (read from ``source``) with an absolute ``path``."""
    resolved = {**resolved, "path": str(_dataset_root(resolved, source).resolve())}
    text = f"# Written by visionpeft from {source} {how}\n" + yaml.safe_dump(resolved, sort_keys=False,
                                                                              allow_unicode=True)
    return atomic_write_bytes(Path(out_dir) / RESOLVED_NAME, text.encode())


def class_names(names: Any, nc: int | None = None) -> list[str]:
    """Class names as a list by index, from a list or an ``{index: name}`` dict (a data YAML's ``names:``, a
    model's ``names``); without names, Ultralytics' ``class0``, ``class1``, ..."""
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if names:
        return [str(n) for n in names]
    return [f"class{i}" for i in range(nc or 0)]


NAMES_FIX = "pass the dataset it was trained on, or allow it explicitly (check_names=False)"


def check_class_names(expected: Any, data: str | Path, fix: str = NAMES_FIX) -> None:
    """Raise ValueError (one line, naming both lists) if the dataset ``data`` (a data YAML path or name) has other
    class names than ``expected`` (a model's or an adapter's). Evaluating on other classes gives a meaningless,
    near-zero mAP rather than an error, so callers check first."""
    resolved, source = load_dataset(data)
    want, got = class_names(expected), class_names(resolved.get("names"), resolved.get("nc"))
    if want == got:
        return
    differ = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))

    def show(names: list[str]) -> str:
        return str(names) if len(names) <= 10 else f"{names[:8]} ... ({len(names)} classes)"

    raise ValueError(f"The model's classes {show(want)} differ from those of '{source}' {show(got)} (first "
                     f"difference at class {differ}); its mAP there would be meaningless: {fix}.")
