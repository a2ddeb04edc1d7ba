"""Synthetic images of what a base model knew, from its BatchNorm statistics alone (``peft.distill_dreams``).

A keep-base run trains on the new dataset only, and on those images the adapted trunk hardly moves the base's class
scores; on COCO's images it moves them five times as much (README, "Keep the base classes"): distillation on the
new images cannot see the drift that costs the base classes their mAP. DeepInversion (Yin et al. 2020, "Dreaming
to distill"; for detectors DIODE, Chawla et al. 2021) recovers inputs that excite what the base learned without
any of its data: images optimised until every BatchNorm's batch statistics match the running statistics the base
kept from its own training set. The distillation (:mod:`.distill`) then also matches the base on these images.

The images depend only on the base weights, their number, size, optimisation steps and seed; they are saved in the
run folder (``dreams.safetensors``, tensors and metadata only) and reused when a run with the same settings resumes.
A run distils on a fixed set of them; :func:`zoom_flip` gives each step new views of it (``peft.dream_augment``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

TV_WEIGHT = 20.0  # total variation: smooth images, as DeepInversion's image prior (its weights: 1e-4 .. 1e-2 of l2)
# the class targets' term (``objects``): at 30, yolo11n's targets reach scores of 0.25-0.75 in 100 steps while the
# BatchNorm distances grow ~10 % (1: the targets stay near 0; 100: the distances +50 %)
OBJECT_WEIGHT = 30.0
JITTER = 1 / 16  # random shift per step, a fraction of the image size (DeepInversion's jitter: 30 of 224 px)


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]


OBJECTS_NEED = ("dream_objects needs a YOLO detection head with NMS (YOLOv5u, v8, 11): its raw class scores are "
                "what the targets raise.")


def _num_classes(model: nn.Module) -> int:
    """The class count of a YOLO detection model's head (``model.model[-1].nc``), else :data:`OBJECTS_NEED`."""
    layers = getattr(model, "model", None)
    nc = getattr(layers[-1], "nc", None) if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(nc, int) or nc < 1:
        raise ValueError(OBJECTS_NEED)
    return nc


def _class_scores(out) -> torch.Tensor:
    """The raw class logits ``(B, nc, anchors)`` of a YOLO detection model's eval-mode output ``(y, raw)``."""
    raw = out[1] if isinstance(out, (tuple, list)) else out
    if not isinstance(raw, dict) or "scores" not in raw:
        raise ValueError(OBJECTS_NEED)
    return raw["scores"]


def dream_targets(n: int, nc: int, objects: int, seed: int = 0) -> torch.Tensor:
    """The ``(n, objects)`` target classes of :func:`dream_images`' images, drawn uniformly from ``nc``."""
    return torch.randint(0, nc, (n, objects), generator=torch.Generator().manual_seed(seed))


def dream_images(model: nn.Module, n: int, imgsz: int, steps: int, seed: int = 0, batch: int = 16,
                 lr: float = 0.1, objects: int = 0) -> torch.Tensor:
    """``n`` RGB images (``n, 3, imgsz, imgsz``, values in 0-1) whose statistics at every BatchNorm of ``model``
    (eval mode, frozen) match its running ones, after ``steps`` Adam steps per batch of ``batch`` images.

    The loss per batch is DeepInversion's: for each BatchNorm the distance of its input's per-channel mean and
    variance over the batch to the running ones, plus a total-variation prior; the image is jittered and flipped
    at random each step. ``objects`` > 0 (a YOLO detector): each image also gets that many target classes, drawn
    uniformly, and the loss raises the base's top score for each of them anywhere in the image (DeepInversion's
    class target, per object as DIODE's, without boxes): images where the base sees its classes, not only its
    texture statistics. The run's random streams are left as they were."""
    norms = _norm_layers(model)
    if not norms:
        raise ValueError("distill_dreams needs a base with BatchNorm layers (their statistics are what it matches).")
    stats: list[torch.Tensor] = []

    def match(module: nn.Module, args: tuple) -> None:
        x = args[0].float()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        stats.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    hooks = [m.register_forward_pre_hook(match) for m in norms]
    gen = torch.Generator().manual_seed(seed)
    shift = max(1, round(imgsz * JITTER))
    targets = dream_targets(n, _num_classes(model), objects, seed) if objects else None
    out = []
    try:
        with torch.enable_grad():
            for start in range(0, n, batch):
                b = min(batch, n - start)
                logits = (torch.randn(b, 3, imgsz, imgsz, generator=gen) * 0.2).requires_grad_()
                opt = torch.optim.Adam([logits], lr=lr, betas=(0.5, 0.99))
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
                for _ in range(steps):
                    dy, dx = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
                    img = torch.roll(logits, (dy, dx), (2, 3)).sigmoid()
                    if torch.rand((), generator=gen) < 0.5:
                        img = img.flip(3)
                    stats.clear()
                    pred = model(img)
                    tv = (img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., 1:] - img[..., :-1]).abs().mean()
                    loss = sum(stats) + TV_WEIGHT * tv
                    if targets is not None:  # each target class's best anchor, toward a score of 1
                        scores, cls = _class_scores(pred).float(), targets[start:start + b]
                        top = scores.gather(1, cls[..., None].expand(-1, -1, scores.shape[-1])).amax(-1)
                        loss = loss - OBJECT_WEIGHT * F.logsigmoid(top).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                out.append(logits.detach().sigmoid())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


def zoom_flip(images: torch.Tensor, gen: torch.Generator, max_zoom: float = 2.0) -> torch.Tensor:
    """Each image zoomed by a factor drawn log-uniformly from ``1 / max_zoom`` to ``max_zoom`` (in: a random crop
    resized to the full size; out: shrunk onto a grey canvas at a random place, as Ultralytics' letterbox fills) and
    flipped left-right with probability 0.5. Draws only from ``gen``."""
    n, _, h, w = images.shape
    out = images.new_full(images.shape, 114 / 255)
    log_zoom = (torch.rand(n, generator=gen) * 2 - 1) * math.log(max_zoom)
    flips = torch.rand(n, generator=gen) < 0.5
    for i, (img, z) in enumerate(zip(images, log_zoom.exp().tolist(), strict=True)):
        ch, cw = max(1, round(h / max(z, 1.0))), max(1, round(w / max(z, 1.0)))  # the crop (all of it at z <= 1)
        y, x = (torch.randint(0, d + 1, (), generator=gen).item() for d in (h - ch, w - cw))
        th, tw = max(1, round(h * min(z, 1.0))), max(1, round(w * min(z, 1.0)))  # its size on the canvas
        v = F.interpolate(img[None, :, y:y + ch, x:x + cw], (th, tw), mode="bilinear", align_corners=False)[0]
        ty, tx = (torch.randint(0, d + 1, (), generator=gen).item() for d in (h - th, w - tw))
        out[i, :, ty:ty + th, tx:tx + tw] = v.flip(-1) if flips[i] else v
    return out


def load_or_dream(model: nn.Module, path: Path, n: int, imgsz: int, steps: int, seed: int,
                  fingerprint: str, objects: int = 0) -> tuple[torch.Tensor, bool]:
    """The images of :func:`dream_images` for these settings: read from ``path`` if it holds them (a resumed run),
    else made and saved there. Returns the images and whether they were made now."""
    meta = {"n": str(n), "imgsz": str(imgsz), "steps": str(steps), "seed": str(seed), "base": fingerprint}
    if objects:  # files made before the targets existed keep their metadata
        meta["objects"] = str(objects)
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}) == meta:
                    return f.get_tensor("images").float(), False
        except (SafetensorError, OSError):
            pass  # unreadable: make them again
    images = dream_images(model, n, imgsz, steps, seed, objects=objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"images": images.to(torch.float16).contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return images.to(torch.float16).float(), True  # the saved precision, so a resumed run sees the same images
