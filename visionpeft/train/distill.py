"""Distillation from the untouched base (``peft.distill_base``): an adapter learns new classes while the base's
class outputs, read from the *adapted* features, keep predicting what the base predicted.

This is what a single-path keep-base model needs (``families.yolo_keep.single_path_model``: the base's class
convs beside the adapter's, one network run): trained plainly, the adapted features cost the base classes most of
their mAP (README, "Keep the base classes"), and so do the shared-trunk modes (``keep_base: head`` or
``classes``: the base's head, or its class branch, on the adapted trunk). On the new dataset's images (no
base-class data) the loss adds the base's own predictions as soft targets, as Ultralytics' detection loss weighs
its terms:

* class scores: BCE of the base class convs on the student's class features against the teacher's probabilities,
  normalised by their sum (Ultralytics normalises its class loss by the target scores' sum), times ``hyp.cls``;
* boxes: the DFL bin distributions of every anchor, KL to the teacher's, weighted by the teacher's top class
  probability (where the base sees an object), times ``hyp.dfl``.

That is ``kind="scores"``, whose class term is flat where the teacher's scores are near 0 (most anchors of images
with no base-class object). ``kind="logits"`` (Shmelkov et al. 2017, "Incremental learning of object detectors
without catastrophic forgetting") replaces it by the mean squared difference of the base's class logits, which
holds every logit alike; ``kind="features"`` distills what the base's head reads instead of what it outputs: the
mean squared difference of the head's input features, per level relative to the teacher's mean square, summed over
levels. Measured on crop_weed (README, "Keep the base classes"), both kept fewer base-class points than ``scores``
for the new-class mAP they reached: L2 spends its weight on the many background logits and lets the few strong
responses drift.

The teacher is a copy of the model with no adapter active (the untouched base), run without gradients; it lives in
the loss, not in the model, so checkpoints and the EMA never carry it (Ultralytics strips ``criterion`` on save).

With synthetic images of what the base knew (:mod:`.dreams`, ``peft.distill_dreams``), each loss call also runs
the student on a quarter-batch of them and adds the same terms against the teacher's outputs there (computed once,
or on each step's new view of them with ``peft.dream_augment``), with ``peft.dream_weight``: the new images alone
hardly excite the base-class responses that the adapters move.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import set_adapter
from ..keep_modes import SHARED_BOXES, SHARED_TRUNK
from .dreams import zoom_flip

# what each kind matches, as the trainer's log line says it
DISTILL_KINDS = {"scores": "class scores and boxes", "logits": "class logits and boxes",
                 "features": "head input features"}


def check_distill_kind(kind: str) -> None:
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill_kind must be one of {list(DISTILL_KINDS)}, not {kind!r}.")


def check_distill_base(value: float, name: str = "distill_base") -> None:
    """A distillation weight (``distill_base``, ``dream_weight``): a number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (0: off; 1: the detection loss's own weights), "
                         f"not {value!r}.")


def untouched_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` with no adapter active: the base it was built on."""
    teacher = copy.deepcopy(model)
    teacher.criterion = None
    set_adapter(teacher, None)
    return teacher.eval().requires_grad_(False)


class BaseDistillLoss:
    """Ultralytics' detection loss of ``model`` plus ``weight`` x the distillation terms (module docstring); loss
    items gain ``kd_loss``. The student's base outputs follow the merged model ``keep_base`` builds: ``"head"``,
    the base's whole head on the adapted trunk's features; ``"classes"``, the base's whole class branch on them
    and the adapted boxes; otherwise (one path) the base's class-output convs in the adapted head."""

    def __init__(self, model: nn.Module, weight: float, keep_base: bool | str = False, kind: str = "scores") -> None:
        check_distill_base(weight)
        check_distill_kind(kind)
        head = model.model[-1]
        if getattr(head, "one2one_cv2", None) is not None or not hasattr(head, "cv3"):
            raise ValueError("distill_base needs a YOLO head with NMS (YOLOv5u, v8, 11), not an end-to-end one.")
        self.det = model.init_criterion()
        self.teacher = untouched_copy(model)
        self.head, self.weight, self.keep_base, self.kind = head, float(weight), keep_base, kind
        self.student = weakref.ref(model)  # the trained model runs the dreams; a weak reference, no cycle
        self.dreams: torch.Tensor | None = None
        self.dream_targets: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        self.dream_step, self.dream_weight, self.dream_augment, self.dream_seed = 0, self.weight, False, 0

    def set_dreams(self, images: torch.Tensor, weight: float | None = None, augment: bool = False, seed: int = 0,
                   chunk: int = 16) -> None:
        """Also distill on ``images`` (:mod:`.dreams`), with ``weight`` (default: the loss's own). Fixed images:
        the teacher's outputs on them are computed here, once; ``augment``: each step sees a new zoomed and flipped
        view of its dreams (:func:`.dreams.zoom_flip`, drawn from ``seed`` and the step), and the teacher runs on it."""
        self.dream_weight = self.weight if weight is None else float(weight)
        self.dream_augment, self.dream_seed = bool(augment), int(seed)
        self.dream_targets = {}
        if not augment:
            parts = [self._teacher_outputs(images[i:i + chunk]) for i in range(0, len(images), chunk)]
            self.dream_targets = {k: ([torch.cat([p[k][j] for p in parts]) for j in range(len(parts[0][k]))]
                                      if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts]))
                                  for k in ("scores", "boxes", "feats")}
        self.dreams = images

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.det(preds, batch)
        img = batch["img"]
        kd = self.distill(self.det.parse_output(preds), img)
        if self.dreams is not None:  # in units of the loss's weight, as kd_loss is logged
            kd = kd + self.dream_weight / self.weight * self._dream_term(max(1, img.shape[0] // 4), img)
        items = {**items, "kd_loss": kd.detach()}
        return torch.cat((loss, (self.weight * kd * img.shape[0]).view(1))), items

    def _dream_term(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The terms on the next ``n`` dreams, in turn (no draw from the run's random streams); the trainer sets
        ``dream_step`` to the batch's index in the run, so a resumed run distills on the same ones (and views)."""
        idx = (torch.arange(n) + self.dream_step * n) % len(self.dreams)
        images = self.dreams[idx]
        if self.dream_augment:
            gen = torch.Generator().manual_seed(self.dream_seed * 1_000_003 + self.dream_step)
            images = zoom_flip(images, gen)
        self.dream_step += 1
        images = images.to(like.device, like.dtype)
        raw = self.det.parse_output(self.student()(images))
        if self.dream_augment:
            target = self._teacher_outputs(images)
        else:
            target = {k: ([t[idx].to(like.device) for t in v] if isinstance(v, list) else v[idx].to(like.device))
                      for k, v in self.dream_targets.items()}
        return self.match(raw, target, n)

    def _teacher_outputs(self, img: torch.Tensor) -> dict:
        with torch.no_grad():
            out = self.teacher(img)
        return out[1] if isinstance(out, tuple) else out

    def distill(self, raw: dict[str, torch.Tensor], img: torch.Tensor) -> torch.Tensor:
        """The distillation terms for one batch, given the student's raw head outputs (``boxes``, ``feats``)."""
        return self.match(raw, self._teacher_outputs(img), img.shape[0])

    def match(self, raw: dict[str, torch.Tensor], target: dict, bs: int) -> torch.Tensor:
        """The distillation terms of the student's raw head outputs against the teacher's (``target``)."""
        if self.kind == "features":
            return sum(((s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
                       for s, t in zip(raw["feats"], target["feats"], strict=True))
        t_prob = target["scores"].sigmoid()  # (B, nc_base, A), no gradient: the teacher's
        base_head = self.teacher.model[-1]
        if self.keep_base == SHARED_TRUNK:  # the base's own head reads the shared, adapted trunk
            student = base_head.forward_head(raw["feats"], **base_head.one2many)
            logits, boxes = student["scores"], student["boxes"]
        elif self.keep_base == SHARED_BOXES:  # the base's class branch on the adapted trunk, the adapted boxes
            pairs = zip(base_head.cv3, raw["feats"], strict=True)
            logits = torch.cat([branch(x).view(bs, base_head.nc, -1) for branch, x in pairs], -1)
            boxes = raw["boxes"]
        else:  # one path: the base's class convs on the adapted class features, the adapted boxes
            pairs = zip(base_head.cv3, self.head.cv3, raw["feats"], strict=True)
            logits = torch.cat([old[-1](new[:-1](x)).view(bs, base_head.nc, -1) for old, new, x in pairs], -1)
            boxes = raw["boxes"]
        if self.kind == "logits":
            cls = (logits - target["scores"]).pow(2).mean()
        else:
            bce = F.binary_cross_entropy_with_logits(logits, t_prob, reduction="none")
            entropy = F.binary_cross_entropy(t_prob, t_prob, reduction="none")  # the BCE at a match: loss 0 there
            cls = (bce - entropy).sum() / t_prob.sum().clamp(min=1.0)

        reg = self.head.reg_max
        s_log = boxes.view(bs, 4, reg, -1).log_softmax(2)
        t_log = target["boxes"].view(bs, 4, reg, -1).log_softmax(2)
        kl = (t_log.exp() * (t_log - s_log)).sum(2).mean(1)  # (B, A): mean over the 4 sides
        w = t_prob.amax(1)
        box = (kl * w).sum() / w.sum().clamp(min=1.0)
        return self.det.hyp.cls * cls + self.det.hyp.dfl * box
