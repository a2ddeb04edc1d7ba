"""``PeftDetectionTrainer``: the Ultralytics detection trainer, training adapters only.

Everything else is Ultralytics' own (datasets, mosaic and other augmentation, loss, metrics, EMA, LR schedule,
AMP, progress bars, ``results.csv``). The overrides below handle what full fine-tuning assumes:

* ``get_model`` injects the adapters into the pretrained base (Ultralytics' ``Model.train()`` rebuilds the model
  through this method, so adapters added before ``train()`` would otherwise be dropped);
* ``build_optimizer`` re-freezes the base, since ``_setup_train`` re-enables ``requires_grad`` on every parameter,
  and gives the optimizer the trainable parameters only;
* ``_model_train`` keeps frozen BatchNorm layers in eval mode, so their running statistics do not drift;
* ``save_model`` writes ``last.pt``/``best.pt`` atomically and, next to them, the adapter files
  ``last.safetensors``/``best.safetensors`` in float32 (the ``.pt`` files hold an fp16 copy of the EMA);
* ``resume_training`` restores the exact fp32 base weights that the fp16 checkpoint rounded.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from ..inject import STATE_ATTR, fingerprint, freeze, frozen_norm_modules, inject, set_adapter, trainable_report
from ..io import adapter_state_dict, save_adapter
from ..methods import LoraConfig, config_from_dict
from ..models import load_base


@dataclass
class PeftSpec:
    """What to train: adapter name, method configs (dicts as in YAML), BatchNorm policy, LR multiplier.

    ``bn``: ``"frozen"`` keeps BatchNorm weights and statistics of the base (eval mode); ``"train"`` gives each
    BatchNorm a trainable copy (affine and running statistics) saved with the adapter.
    ``lr_mult`` scales the learning rate Ultralytics picks (adapters often want more than full fine-tuning).
    """

    adapter_name: str = "default"
    methods: list[dict] = field(default_factory=lambda: [LoraConfig().to_dict()])
    bn: str = "frozen"
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.bn not in {"frozen", "train"}:
            raise ValueError(f"peft.bn must be 'frozen' or 'train', not '{self.bn}'.")
        for m in self.methods:
            config_from_dict(m)  # fail early, with the list of valid options

    def configs(self) -> list[dict]:
        extra = [{"method": "trainable", "target_types": ["BatchNorm2d"]}] if self.bn == "train" else []
        return [*self.methods, *extra]


def copy_base_tensors(dst: nn.Module, src: nn.Module) -> None:
    """Copy every non-adapter tensor of ``src`` into ``dst`` (models of the same structure)."""
    src_sd = src.state_dict()
    for k, v in dst.state_dict().items():
        if ".adapters." not in k:
            v.copy_(src_sd[k.replace(".base_layer.", ".")] if k not in src_sd else src_sd[k])


class PeftDetectionTrainer(DetectionTrainer):
    """Ultralytics ``DetectionTrainer`` that trains the adapters of ``peft`` (a :class:`PeftSpec` or its dict)."""

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks=None,
                 peft: PeftSpec | dict | None = None) -> None:
        self.peft = peft if isinstance(peft, PeftSpec) else PeftSpec(**(peft or {}))
        super().__init__(cfg, overrides, _callbacks)

    # -- model -------------------------------------------------------------------------------------------------
    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> DetectionModel:
        name = self.peft.adapter_name
        if weights is not None and hasattr(weights, STATE_ATTR):  # resume (last.pt), or adapters injected by hand
            model = copy.deepcopy(weights).float()
            self._restore_base(model)
            if name in model.visionpeft["adapters"]:
                set_adapter(model, name)
            else:
                inject(model, self.peft.configs(), adapter_name=name, names=self.data["names"])
        else:
            base = (copy.deepcopy(weights).float() if weights is not None
                    else DetectionModel(cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=False))
            model = inject(base, self.peft.configs(), adapter_name=name, names=self.data["names"])
            if str(self.args.model).endswith(".pt"):
                model.visionpeft["base"] = str(Path(self.args.model).resolve())
        if verbose:
            LOGGER.info(f"visionpeft adapter '{name}':\n{trainable_report(model)}")
        # Ultralytics' _setup_train warns once per frozen parameter and unfreezes it anyway; build_optimizer
        # freezes again, before any backward pass.
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _restore_base(self, model: nn.Module) -> None:
        """Put back the fp32 base weights that an fp16 ``last.pt`` rounded, from the base file if it still fits."""
        source = model.visionpeft.get("base")
        if not source or not Path(source).is_file():
            LOGGER.warning(f"visionpeft: base weights '{source}' not found; continuing from the checkpoint's copy.")
            return
        base = load_base(source)
        if fingerprint(base) != model.visionpeft["fingerprint"]:
            raise ValueError(f"The base weights at '{source}' changed since this run started (fingerprint "
                             f"{fingerprint(base)} != {model.visionpeft['fingerprint']}); cannot resume on them.")
        copy_base_tensors(model, base)

    # -- optimisation ------------------------------------------------------------------------------------------
    def build_optimizer(self, model, name="auto", lr=0.001, momentum=0.9, decay=1e-5, iterations=1e5):
        freeze(unwrap_model(model))
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
            group["lr"] *= self.peft.lr_mult
        n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        LOGGER.info(f"visionpeft: optimizer gets {n:,} trainable parameters (lr x{self.peft.lr_mult:g})")
        return optimizer

    def _model_train(self) -> None:
        super()._model_train()
        for m in frozen_norm_modules(unwrap_model(self.model)):
            m.eval()

    def resume_training(self, ckpt) -> None:
        super().resume_training(ckpt)
        if ckpt is not None and self.resume and self.ema:  # the EMA came back from fp16 too
            copy_base_tensors(self.ema.ema, unwrap_model(self.model))

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_model(self) -> bool:
        """Ultralytics' checkpoints, written atomically, plus the float32 adapter files beside them."""
        last, best = self.last, self.best
        tmp_last, tmp_best = last.with_name(f".{last.name}.tmp"), best.with_name(f".{best.name}.tmp")
        self.last, self.best = tmp_last, tmp_best
        try:
            saved = super().save_model()
        finally:
            self.last, self.best = last, best
        is_best = tmp_best.exists()
        extra = {"epoch": self.epoch, "fitness": None if self.fitness is None else float(self.fitness)}
        save_adapter(self.ema.ema, last.with_suffix(".safetensors"), extra=extra)
        os.replace(tmp_last, last)
        if is_best:
            save_adapter(self.ema.ema, best.with_suffix(".safetensors"), extra=extra)
            os.replace(tmp_best, best)
        return saved

    def adapter_tensors(self) -> dict:
        """The current (EMA) adapter tensors, for inspection and tests."""
        return adapter_state_dict(self.ema.ema)
