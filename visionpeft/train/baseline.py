"""``BaselineDetectionTrainer``: plain Ultralytics fine-tuning (every weight, or Ultralytics' ``freeze=``) of any
detector visionpeft builds, ViT detectors (``vitdet:...``) included: the baselines PEFT runs are measured against.

Training is Ultralytics' ``DetectionTrainer``'s. ``get_model`` builds a ViT detector spec through visionpeft (an
Ultralytics ``DetectionModel`` could not parse it; model YAMLs and ``.pt`` files take Ultralytics' own path), and
datasets are found by name and nothing downloads (fonts, the AMP check). ``channels_last=True`` is honoured on the
CPU too (Ultralytics ignores it there): 17-21 % less time per epoch on a 2-core Xeon (README, Benchmark).
``ema_tau`` sets the EMA's time constant in optimizer steps (``"auto"``: scaled to the run, :mod:`.ema`; ``None``:
Ultralytics' own). ``PeftDetectionTrainer`` builds on it.
"""

from __future__ import annotations

import torch
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER, RANK

from ..datasets import resolve_dataset
from ..fonts import ensure_fonts
from ..integrations.ultralytics import TrainerHooks
from ..models import build_detector
from ..vitdet.model import is_vitdet
from .ema import check_ema_tau, set_ema_timescale
from .offline import offline_amp_check


class BaselineDetectionTrainer(TrainerHooks, DetectionTrainer):
    def __init__(self, *args, ema_tau: float | str | None = None, **kwargs) -> None:
        check_ema_tau(ema_tau)
        self._ema_tau = ema_tau
        ensure_fonts()  # before get_dataset(), whose check_font would download Arial.ttf
        super().__init__(*args, **kwargs)
        if BaselineDetectionTrainer._set_ema_timescale not in self.callbacks["on_pretrain_routine_end"]:
            self.add_callback("on_pretrain_routine_end", BaselineDetectionTrainer._set_ema_timescale)

    @property
    def ema_tau(self) -> float | str | None:
        return self._ema_tau

    def _set_ema_timescale(self) -> None:
        """Callback, after ``_setup_train`` built the EMA (and a resume restored its update count)."""
        line = set_ema_timescale(self)
        if line and RANK in {-1, 0}:
            LOGGER.info(f"visionpeft: {line}")

    def get_dataset(self) -> dict:
        if self.args.data:  # datasets/ names and ${assets} paths, as PeftDetectionTrainer finds them
            self.args.data = str(resolve_dataset(self.args.data, self.save_dir))
        return super().get_dataset()

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        if weights is None and is_vitdet(cfg):  # a fresh ViT detector: pretrained ViT, new pyramid and head
            return build_detector(cfg, nc=self.data["nc"], ch=self.data["channels"])
        return super().get_model(cfg, weights, verbose and RANK == -1)

    def on_model_setup(self) -> None:
        # NHWC convs run faster on this x86 CPU (oneDNN); a PEFT model has its adapters by now, so they convert too
        if self.cpu_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def setup_train_context(self):
        return offline_amp_check()
