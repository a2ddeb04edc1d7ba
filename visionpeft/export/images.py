"""Real images for INT8 calibration and parity checks, preprocessed as Ultralytics preprocesses them.

Calibration ranges and output differences are only meaningful on the inputs the model sees in deployment: real
photos, letterboxed to the export size with Ultralytics' padding value, RGB, scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def split_images(data: str | Path, split: str = "val", limit: int | None = None) -> list[Path]:
    """Image files of one split of a YOLO dataset YAML, ``limit`` of them spread evenly over the split."""
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    if not Path(data).is_file():
        raise FileNotFoundError(f"Dataset YAML '{data}' not found. Pass the data.yaml of a YOLO-format dataset.")
    info = check_det_dataset(str(data))
    sources = info.get(split) or info.get("val")  # a dataset without the wanted split still has its val split
    if not sources:
        raise ValueError(f"Dataset '{data}' has no '{split}' split to take images from.")
    files: list[Path] = []
    for source in sources if isinstance(sources, (list, tuple)) else [sources]:
        p = Path(source)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.suffix == ".txt" and p.is_file():
            lines = [x.strip() for x in p.read_text().splitlines() if x.strip()]
            files += [(p.parent / x).resolve() if not Path(x).is_absolute() else Path(x) for x in lines]
        elif p.is_file():
            files.append(p)
    if not files:
        raise ValueError(f"No images found in the '{split}' split of '{data}' ({sources}).")
    if limit is not None and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def sample_images(data: str | Path | None, split: str = "val", limit: int = 4) -> list[Path]:
    """Images for parity checks: from ``data`` when given, else the photos that ship with Ultralytics."""
    if data is not None:
        return split_images(data, split, limit)
    from ultralytics.utils import ASSETS

    return sorted(ASSETS.glob("*.jpg"))[:limit]


def letterbox(path: str | Path, imgsz: tuple[int, int]) -> np.ndarray:
    """One image as a ``(1, 3, h, w)`` float32 batch: resized keeping its aspect, padded with 114, RGB, /255."""
    import cv2
    from ultralytics.data.augment import LetterBox

    im = cv2.imread(str(path))
    if im is None:
        raise ValueError(f"Cannot read image '{path}' (missing or not an image).")
    im = LetterBox(new_shape=tuple(imgsz), auto=False)(image=im)
    return np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
