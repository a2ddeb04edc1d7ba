"""A few unaugmented batches of the run's own train images: losses for rank planning (``peft.budget``), and inputs for
``init: eva``; and the split's image count, for methods with ``min_images``.

The planner (:mod:`visionpeft.budget`) knows no Ultralytics; this gives it Ultralytics' dataset, batch format and
detection loss, exactly as the trainer computes them, on images spread over the train split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


def _train_dataset(trainer, batch: int):
    """Ultralytics' train dataset of ``trainer`` (its ``fraction`` and class filters included), letterbox only."""
    from ultralytics.data import build_yolo_dataset

    cfg = copy.copy(trainer.args)
    cfg.cache = False  # a few images; a RAM cache of the whole split would cost more than the probe
    dataset = build_yolo_dataset(cfg, trainer.data["train"], batch, trainer.data, mode="train", rect=False)
    dataset.augment = False
    dataset.transforms = dataset.build_transforms(hyp=cfg)  # YOLODataset: letterbox and format when not augmenting
    return dataset


def train_images(trainer) -> int:
    """How many images the run trains on: its train split after ``fraction`` and class filters."""
    return len(_train_dataset(trainer, int(trainer.args.batch)))


def probe_loader(trainer, images: int = 64, batch: int = 16) -> DataLoader:
    """``images`` train images spread over the split, ``batch`` at a time, as Ultralytics batches them.

    The dataset is Ultralytics' train dataset of ``trainer`` (its ``fraction`` and class filters included) with the
    letterbox only: a probe should see the data, not one random draw of mosaic and colour jitter.
    """
    dataset = _train_dataset(trainer, batch)
    count = min(images, len(dataset))
    picks = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    return DataLoader(Subset(dataset, picks), batch_size=batch, shuffle=False, num_workers=0,
                      collate_fn=dataset.collate_fn)


def preprocessed(trainer, b: dict) -> dict:
    """``DetectionTrainer.preprocess_batch`` without multi-scale: tensors on the trainer's device, images in 0-1."""
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            b[k] = v.to(trainer.device)
    b["img"] = b["img"].float() / 255
    return b


def probe_images(trainer, images: int = 64, batch: int = 16) -> Iterator[torch.Tensor]:
    """The images of :func:`probe_loader`, as the model takes them (``init: eva`` reads its layers' inputs)."""
    for b in probe_loader(trainer, images, batch):
        yield preprocessed(trainer, b)["img"]


def probe_losses(trainer, images: int = 64, batch: int = 16) -> Callable[[nn.Module], Iterator[torch.Tensor]]:
    """``losses(model)``: the summed detection loss of the :func:`probe_loader` images."""
    loader = probe_loader(trainer, images, batch)

    def losses(model: nn.Module) -> Iterator[torch.Tensor]:
        model.args = trainer.args  # the loss reads its gains (box, cls, dfl) from the model, as in training
        for b in loader:
            yield model.loss(preprocessed(trainer, b))[0].sum()

    return losses
