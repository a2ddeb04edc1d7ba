"""Keep Ultralytics training off the network: the AMP check on GPUs (fonts: :mod:`visionpeft.fonts`).

``YOLO_OFFLINE`` (set by ``visionpeft.settings``) only turns off Ultralytics' online checks. Two places download
anyway: ``check_font`` (every ``check_det_dataset`` call, and plot labels) asks GitHub for ``Arial.ttf`` unless a
file of that name sits in Ultralytics' ``USER_CONFIG_DIR``, and ``check_amp`` (CUDA with ``amp=True``) downloads
``yolo26n.pt`` to compare fp32 and fp16 outputs.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..integrations.ultralytics import amp_check_replaced

# GPUs on which Ultralytics disables AMP (NaN losses), as in ultralytics.utils.checks.check_amp.
AMP_BROKEN_GPUS = re.compile(r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
                             re.IGNORECASE)


def outputs_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A detector's raw outputs in fp32 (``a``: boxes, then class probabilities, per anchor) and under autocast
    (``b``) agree: all finite, the boxes within 1 % (relative L2 over every anchor), each probability within 0.05.

    Ultralytics compares the boxes left after NMS to 0.5 px; over every anchor (a new head has no confident box) an
    elementwise bound fails on sound GPUs: on the H200 lent on 2026-12-04 the check rejected AMP in every run, and
    on a CPU, bfloat16 autocast (3 mantissa bits fewer than float16) moved 136 of 112,896 values of yolo11n's output
    on bus.jpg past 0.5 px + 1 % (one box by 11.7 px) at 0.4 % relative error."""
    if a.shape != b.shape or not torch.isfinite(b).all():
        return False
    a, b = a.float(), b.float()
    boxes = float((a[:, :4] - b[:, :4]).norm()) <= 0.01 * float(a[:, :4].norm())
    return boxes and bool(((a[:, 4:] - b[:, 4:]).abs() <= 0.05).all())


def amp_works(model: nn.Module) -> bool:
    """Ultralytics' AMP check, on the model being trained (:func:`outputs_agree`).

    Ultralytics runs it on a downloaded ``yolo26n.pt``; the adapted base needs no download and is the model that
    matters.
    """
    from ultralytics.utils import ASSETS, LOGGER
    from ultralytics.utils.torch_utils import unwrap_model

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False  # Ultralytics uses AMP on accelerators only
    name = torch.cuda.get_device_name(device)
    if AMP_BROKEN_GPUS.search(name):
        LOGGER.warning(f"AMP: disabled on {name} (NaN losses or zero mAP reported with AMP on this GPU).")
        return False
    m = copy.deepcopy(unwrap_model(model)).eval()
    try:
        import cv2

        im = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (256, 256))[..., ::-1].copy()
        x = torch.from_numpy(im).permute(2, 0, 1)[None].float().div(255).to(device)
    except Exception:  # no sample image: a fixed random one tests the arithmetic as well
        x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a = m(x)
        with torch.autocast("cuda"):
            b = m(x)
    a, b = (t[0] if isinstance(t, (list, tuple)) else t for t in (a, b))
    ok = outputs_agree(a, b)
    if ok:
        LOGGER.info("AMP: checks passed on the model being trained (offline; Ultralytics' check downloads yolo26n.pt)")
    else:
        LOGGER.warning("AMP: fp16 outputs of the model differ from fp32 ones; training in fp32 (amp disabled).")
    return ok


@contextlib.contextmanager
def offline_amp_check() -> Iterator[None]:
    """Inside, Ultralytics' trainer runs :func:`amp_works` instead of its downloading ``check_amp``, unless
    Ultralytics' own test weights are already local."""
    from ultralytics.utils import WEIGHTS_DIR

    if (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
        yield
        return
    with amp_check_replaced(amp_works):
        yield
