"""peft.distill_dreams: synthetic images from the base's BatchNorm statistics, distilled beside each batch.

Real yolo11n.pt, real crop_weed photos, 64 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from safetensors import safe_open
from torch import nn
from ultralytics.cfg import get_cfg

import visionpeft as vp
from visionpeft.export.images import letterbox
from visionpeft.settings import datasets_dir
from visionpeft.train import PeftSpec
from visionpeft.train.distill import BaseDistillLoss, untouched_copy
from visionpeft.train.dreams import dream_images, dream_targets, load_or_dream, zoom_flip

IMGSZ = 64
NAMES = ["crop", "weed"]


def stats_distance(model: nn.Module, x: torch.Tensor) -> float:
    """Sum over BatchNorms of the distance of the batch's input statistics to the running ones."""
    out = []

    def hook(m, args):
        v = args[0]
        out.append(((v.mean((0, 2, 3)) - m.running_mean).norm() + (v.var((0, 2, 3), unbiased=False)
                                                                    - m.running_var).norm()).item())

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(out)


@pytest.fixture(scope="module")
def crop_images() -> torch.Tensor:
    files = sorted((datasets_dir() / "crop_weed" / "valid" / "images").glob("*.jpg"))[:4]
    return torch.from_numpy(np.concatenate([letterbox(f, (IMGSZ, IMGSZ)) for f in files]))


def test_dreams_match_the_base_statistics_and_leave_the_random_streams(base):
    teacher = base("yolo11n.pt").eval().requires_grad_(False)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    state = torch.get_rng_state()
    dreams = dream_images(teacher, n=4, imgsz=IMGSZ, steps=40, seed=0, batch=4)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own draws stay as they were
    assert dreams.shape == (4, 3, IMGSZ, IMGSZ) and dreams.min() >= 0 and dreams.max() <= 1
    noise = torch.rand(4, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    assert stats_distance(teacher, dreams) < 0.7 * stats_distance(teacher, noise)  # what was optimised
    assert torch.equal(dream_images(teacher, n=4, imgsz=IMGSZ, steps=40, seed=0, batch=4), dreams)  # reproducible
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())  # the base is not trained


def test_saved_dreams_are_reused_only_for_the_same_settings(base, tmp_path):
    teacher = base("yolo11n.pt").eval().requires_grad_(False)
    path = tmp_path / "run" / "dreams.safetensors"
    first, made = load_or_dream(teacher, path, n=2, imgsz=IMGSZ, steps=3, seed=0, fingerprint="abc")
    assert made and path.is_file() and not (path.parent / ".dreams.safetensors.tmp").exists()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"n": "2", "imgsz": str(IMGSZ), "steps": "3", "seed": "0", "base": "abc"}
    again, made = load_or_dream(teacher, path, n=2, imgsz=IMGSZ, steps=3, seed=0, fingerprint="abc")
    assert not made and torch.equal(again, first)  # a resumed run reads the very images it distilled on
    other, made = load_or_dream(teacher, path, n=2, imgsz=IMGSZ, steps=3, seed=0, fingerprint="another base")
    assert made and torch.equal(other, first)  # another base: made again (same weights here, so the same)
    objects, made = load_or_dream(teacher, path, n=2, imgsz=IMGSZ, steps=3, seed=0, fingerprint="abc", objects=1)
    assert made and not torch.equal(objects, first)  # other dreams: with a class target each
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["objects"] == "1"
    path.write_bytes(b"not a safetensors file")
    _, made = load_or_dream(teacher, path, n=2, imgsz=IMGSZ, steps=3, seed=1, fingerprint="abc")
    assert made  # unreadable: made again, not an error


def test_dream_objects_make_the_base_see_its_target_classes(base):
    teacher = base("yolo11n.pt").eval().requires_grad_(False)
    targets = dream_targets(4, 80, 2, seed=0)
    assert torch.equal(dream_targets(4, 80, 2, seed=0), targets) and targets.shape == (4, 2)

    def target_scores(images: torch.Tensor) -> torch.Tensor:  # each target class's best score in its image
        with torch.no_grad():
            scores = teacher(images)[1]["scores"].sigmoid()
        return scores.gather(1, targets[..., None].expand(-1, -1, scores.shape[-1])).amax(-1)

    plain = target_scores(dream_images(teacher, n=4, imgsz=IMGSZ, steps=30, seed=0, batch=2))
    seen = target_scores(dream_images(teacher, n=4, imgsz=IMGSZ, steps=30, seed=0, batch=2, objects=2))
    assert seen.median() > 10 * plain.median() and (seen > plain).float().mean() >= 0.75


def test_dream_objects_need_a_yolo_detection_head():
    class Backbone(nn.Module):  # BatchNorms to match, no detection head to score
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    net = Backbone().eval().requires_grad_(False)
    with pytest.raises(ValueError, match=r"dream_objects needs a YOLO detection head with NMS"):
        dream_images(net, n=1, imgsz=16, steps=1, objects=1)
    assert dream_images(net, n=1, imgsz=16, steps=1).shape == (1, 3, 16, 16)  # without targets it dreams as before


def dream_loss(base, kd_weight: float, **dreams_kw) -> tuple[nn.Module, BaseDistillLoss, torch.Tensor]:
    """A DoRA keep-base model in training mode, its distillation loss at ``kd_weight`` and 3 dreams set on it."""
    model = base("yolo11n.pt")
    vp.inject(model, vp.DoraConfig(r=4, alpha=8), adapter_name="plain", names=NAMES, keep_base="classes")
    model.args = get_cfg()
    loss = BaseDistillLoss(model, weight=kd_weight, keep_base="classes")
    dreams = dream_images(untouched_copy(model), n=3, imgsz=IMGSZ, steps=5, seed=0, batch=3)
    loss.set_dreams(dreams, **dreams_kw)
    model.train()
    vp.set_adapter(model, "plain")
    return model, loss, dreams


def labelled(images: torch.Tensor) -> dict:
    return {"img": images, "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
            "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.2]])}


def test_the_dream_term_is_the_base_distillation_on_the_dreams(base, crop_images):
    model, loss, dreams = dream_loss(base, 1.0)
    batch = labelled(crop_images)
    at_init = loss(model(batch["img"]), batch)[1]["kd_loss"]
    assert -1e-6 < at_init.item() < 1e-3  # DoRA at init is the base, on the dreams too
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        on_batch = loss.distill(model(batch["img"]), batch["img"])
        on_dreams = loss.distill(model(dreams[[1]]), dreams[[1]])  # the next in turn: 4 // 4 = 1 dream, the second
    total, items = loss(model(batch["img"]), batch)
    assert loss.dream_step == 2 and torch.allclose(items["kd_loss"], on_batch + on_dreams, rtol=1e-4)
    total.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert grads and all(".adapters.plain." in n for n in grads)  # the dreams move the adapter only


def test_zoom_flip_views_are_drawn_from_their_generator_only(crop_images):
    images = crop_images[:3]
    state = torch.get_rng_state()
    views = zoom_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(zoom_flip(images, torch.Generator().manual_seed(5)), views)  # a resumed run's views
    assert views.shape == images.shape and not torch.equal(zoom_flip(images, torch.Generator().manual_seed(6)), views)
    same = zoom_flip(images, torch.Generator().manual_seed(0), max_zoom=1.0)  # no zoom: the image or its mirror
    assert all(torch.allclose(v, x, atol=1e-6) or torch.allclose(v, x.flip(-1), atol=1e-6)
               for v, x in zip(same, images, strict=True))
    out = zoom_flip(torch.ones_like(images), torch.Generator().manual_seed(1), max_zoom=4.0)
    canvas = torch.isclose(out, torch.tensor(114 / 255))  # zoomed out: Ultralytics' grey around the shrunk image
    assert (canvas | torch.isclose(out, torch.tensor(1.0))).all() and canvas.any()


def test_augmented_dreams_are_distilled_on_the_teacher_view_with_their_own_weight(base, crop_images):
    model, loss, dreams = dream_loss(base, 0.5, weight=2.0, augment=True, seed=3)
    assert not loss.dream_targets  # the teacher runs on each step's view, nothing computed ahead
    randomize_adapters(model, seed=1)
    batch = labelled(crop_images)
    loss.dream_step = 7  # the trainer's batch index: dream 7 % 3 = 1, its view drawn from seed 3 and step 7
    view = zoom_flip(dreams[[1]], torch.Generator().manual_seed(3 * 1_000_003 + 7))
    with torch.no_grad():
        on_batch = loss.distill(model(batch["img"]), batch["img"])
        on_view = loss.distill(model(view), view)
        on_fixed = loss.distill(model(dreams[[1]]), dreams[[1]])
    total, items = loss(model(batch["img"]), batch)
    assert torch.allclose(items["kd_loss"], on_batch + 4.0 * on_view, rtol=1e-4)  # kd_loss in units of weight 0.5
    assert torch.allclose(total[-1], 0.5 * items["kd_loss"] * len(crop_images)) and not torch.isclose(on_view, on_fixed)


def test_dream_settings_are_checked():
    with pytest.raises(ValueError, match=r"peft.distill_dreams needs peft.distill_base > 0"):
        PeftSpec(distill_dreams=8)
    with pytest.raises(ValueError, match=r"peft.distill_dreams needs peft.bn: frozen"):
        PeftSpec(distill_base=1.0, distill_dreams=8, bn="train")
    with pytest.raises(ValueError, match=r"peft.dream_steps must be a whole number >= 0, not 0.5"):
        PeftSpec(distill_base=1.0, distill_dreams=8, dream_steps=0.5)
    with pytest.raises(ValueError, match=r"peft.dream_weight, dream_augment and dream_objects act on peft.distill_dr"):
        PeftSpec(distill_base=1.0, dream_augment=True)
    with pytest.raises(ValueError, match=r"dream_objects act on peft.distill_dreams; set distill_dreams: N"):
        PeftSpec(distill_base=1.0, dream_objects=4)
    with pytest.raises(ValueError, match=r"peft.dream_objects must be a whole number >= 0, not -1"):
        PeftSpec(distill_base=1.0, distill_dreams=8, dream_objects=-1)
    with pytest.raises(ValueError, match=r"peft.dream_weight must be a number >= 0"):
        PeftSpec(distill_base=1.0, distill_dreams=8, dream_weight="x")
    with pytest.raises(ValueError, match=r"peft.dream_augment must be true or false, not 'yes'"):
        PeftSpec(distill_base=1.0, distill_dreams=8, dream_augment="yes")
