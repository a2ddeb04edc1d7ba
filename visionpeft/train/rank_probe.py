"""Training losses for rank planning (``peft.budget``): a few unaugmented batches of the run's own train images.

The planner (:mod:`visionpeft.budget`) knows no Ultralytics; this gives it Ultralytics' dataset, batch format and
detection loss, exactly as the trainer computes them, on images spread over the train split.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


def probe_losses(trainer, images: int = 64, batch: int = 16) -> Callable[[nn.Module], Iterator[torch.Tensor]]:
    """``losses(model)``: the summed detection loss of ``images`` train images, ``batch`` at a time.

    The dataset is Ultralytics' train dataset of ``trainer`` (its ``fraction`` and class filters included) with the
    letterbox only: the planner should see the data, not one random draw of mosaic and colour jitter.
    """
    from ultralytics.data import build_yolo_dataset

    cfg = copy.copy(trainer.args)
    cfg.cache = False  # a few images; a RAM cache of the whole split would cost more than the probe
    dataset = build_yolo_dataset(cfg, trainer.data["train"], batch, trainer.data, mode="train", rect=False)
    dataset.augment = False
    dataset.transforms = dataset.build_transforms(hyp=cfg)  # YOLODataset: letterbox and format when not augmenting
    count = min(images, len(dataset))
    picks = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    loader = DataLoader(Subset(dataset, picks), batch_size=batch, shuffle=False, num_workers=0,
                        collate_fn=dataset.collate_fn)

    def losses(model: nn.Module) -> Iterator[torch.Tensor]:
        model.args = trainer.args  # the loss reads its gains (box, cls, dfl) from the model, as in training
        for b in loader:
            for k, v in b.items():
                if isinstance(v, torch.Tensor):
                    b[k] = v.to(trainer.device)
            b["img"] = b["img"].float() / 255  # DetectionTrainer.preprocess_batch, without multi-scale
            yield model.loss(b)[0].sum()

    return losses
