"""Validate a model on a dataset whose classes are a run of the model's (a keep-base model: base, then new classes).

A keep-base model's new classes come after the base's (crop = class 80), while the dataset it was trained on
numbers them from 0. Ultralytics' validator compares label and predicted class indices directly, so the dataset's
val split is re-labelled with the offset (images linked, labels rewritten) into a scratch folder first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from .datasets import class_names, image_files, load_dataset, resolve_dataset
from .io import atomic_write_bytes


def names_offset(model_names: Any, data_names: Any) -> int | None:
    """Index of the model's class that the dataset's class 0 is, if the dataset's classes are a contiguous run of
    the model's (0 for the same list); else ``None``."""
    model, data = class_names(model_names), class_names(data_names)
    for offset in range(len(model) - len(data) + 1):
        if data and model[offset:offset + len(data)] == data:
            return offset
    return None


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:  # no symlinks (Windows without the privilege): copy
        shutil.copyfile(src, dst)


def offset_dataset(data: str | Path, model_names: Any, offset: int, out_dir: str | Path) -> Path:
    """A data YAML in ``out_dir`` whose val split is ``data``'s with class ``c`` relabelled ``c + offset`` and whose
    names are ``model_names``; ``data`` itself when ``offset`` is 0 (its indices are the model's already)."""
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    if offset == 0:
        return resolve_dataset(data, out_dir)
    out = Path(out_dir)
    info = check_det_dataset(str(resolve_dataset(data, out)))
    images, labels = out / "offset" / "images", out / "offset" / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    sources = info["val"] if isinstance(info["val"], list) else [info["val"]]
    for k, source in enumerate(sources):
        files = image_files(Path(source))
        for image, label in zip(files, img2label_paths(files), strict=True):
            name = f"{k}_{Path(image).name}"  # unique across val folders
            _link(Path(image).resolve(), images / name)
            if os.path.isfile(label):
                rows = [line.split() for line in Path(label).read_text().splitlines() if line.strip()]
                text = "".join(" ".join([str(int(float(r[0])) + offset), *r[1:]]) + "\n" for r in rows)
                (labels / f"{Path(name).stem}.txt").write_text(text)
    names = class_names(model_names)
    yaml_text = yaml.safe_dump({"path": str(out / "offset"), "train": "images", "val": "images",
                                "names": dict(enumerate(names))}, sort_keys=False, allow_unicode=True)
    header = f"# {load_dataset(data)[1]}'s val split, classes + {offset}: the model's class indices\n"
    return atomic_write_bytes(out / "offset.yaml", (header + yaml_text).encode())
