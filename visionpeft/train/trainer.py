"""``PeftDetectionTrainer``: the Ultralytics detection trainer, training adapters only.

Everything else is Ultralytics' own (datasets, mosaic and other augmentation, loss, metrics, EMA, LR schedule,
AMP, progress bars, ``results.csv``). The overrides below handle what full fine-tuning assumes:

* ``get_model`` injects the adapters into the pretrained base (Ultralytics' ``Model.train()`` rebuilds the model
  through this method, so adapters added before ``train()`` would otherwise be dropped), and on ``resume`` takes
  the adapter, recipe and base back from ``last.pt``;
* ``build_optimizer`` re-freezes the base, since ``_setup_train`` re-enables ``requires_grad`` on every parameter,
  and gives the optimizer the trainable parameters only;
  (``freeze`` also turns frozen BatchNorms into ``FrozenBatchNorm2d``: fixed statistics, no saved activations);
* ``on_model_train`` (after Ultralytics' ``_model_train``) keeps frozen norm layers in eval mode
  (FrozenBatchNorm2d ignores the mode anyway; this covers other BatchNorm kinds), so their statistics do not drift;
* ``save_model`` writes ``last.pt``/``best.pt`` atomically and, next to them, the adapter files
  ``last.safetensors`` in float32 (for resume; the ``.pt`` files hold an fp16 copy of the EMA) and
  ``best.safetensors``, the task's deliverable, in float16;
* ``resume_training`` (and NaN recovery) restore the exact fp32 base weights, and the fp32 adapter, that the fp16
  checkpoint rounded; with ``last.state.safetensors`` (:mod:`.resume_state`: random generators, shuffle, mosaic
  buffer, accumulated gradients, fp32 optimizer state) a resumed run continues exactly as if never stopped;
* ``check_resume`` (where Ultralytics settles the args, before it writes to the run folder) locks the run folder
  for this run (:mod:`.runlock`) until ``train`` ends;
* from ``BaselineDetectionTrainer`` (its base, also the benchmark's full fine-tuning): ``get_dataset`` finds data
  YAMLs in the repo's ``datasets/`` and resolves their ``${assets}`` paths, and nothing downloads (a local font
  stands in for ``Arial.ttf``; the AMP check runs on the model being trained).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from ..budget import RankPlan, plan_ranks
from ..data_init import init_from_data
from ..inject import (
    STATE_ATTR,
    fingerprint,
    freeze,
    frozen_norm_modules,
    full_trained_parameters,
    scale_adapter,
    set_adapter,
    trainable_report,
)
from ..io import AdapterFileError, load_adapter_tensors, read_adapter, save_adapter
from ..models import build_detector, load_base
from . import ddp, resume_state, runlock
from .baseline import BaselineDetectionTrainer
from .config import PeftSpec
from .distill import DISTILL_KINDS, BaseDistillLoss
from .dreams import load_or_dream
from .rank_probe import probe_images, probe_losses, train_images

SPEC_KEY = "train"  # model.visionpeft[SPEC_KEY]: the PeftSpec a checkpoint was trained with (for resume)


def copy_base_tensors(dst: nn.Module, src: nn.Module) -> None:
    """Copy every non-adapter tensor of ``src`` into ``dst`` (models of the same structure)."""
    src_sd = src.state_dict()
    for k, v in dst.state_dict().items():
        if ".adapters." not in k:
            v.copy_(src_sd[k.replace(".base_layer.", ".")] if k not in src_sd else src_sd[k])


@contextlib.contextmanager
def streams_kept():
    """Python's, numpy's and torch's random streams as they were after the block: work before the first epoch
    (counting or probing the train images) must not change the batches and augmentations the run draws
    (Ultralytics' Format draws from Python's stream for every image it formats)."""
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:  # a failed probe must not leave the run on another draw either
        random.setstate(state)
        np.random.set_state(np_state)


class PeftDetectionTrainer(BaselineDetectionTrainer):
    """Ultralytics ``DetectionTrainer`` that trains the adapters of ``peft`` (a :class:`PeftSpec` or its dict).

    Without ``peft``, a model that already carries adapters (``Model.train(trainer=...)`` after
    ``visionpeft.inject``) trains its active adapter; otherwise the default spec (LoRA r=8) is injected.
    """

    _accumulate = 1
    _resume_gate: int | None = None  # the interrupted run's last optimizer step, until the resumed run's first

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks=None,
                 peft: PeftSpec | dict | None = None) -> None:
        self._peft_given = peft is not None
        self.peft = peft if isinstance(peft, PeftSpec) else PeftSpec.from_dict(peft or {})
        self.trainable = None  # the TrainableReport, once the optimizer is built
        self.lock: Path | None = None  # the run folder's lock file, held until train() ends
        self._passes: resume_state.PassRecorder | None = None  # the train loader's shuffle, for the state file
        self._batch_i, self._last_opt_step = -1, -1  # batch index in the epoch; `ni` of the last optimizer step
        self._resume_streams: tuple[dict, dict] | None = None  # state file contents for the first resumed epoch
        self._resume_albumentations: list | None = None
        try:
            super().__init__(cfg, overrides, _callbacks)
        except BaseException:
            runlock.release(self.lock)
            raise
        for event, fn in (("on_train_epoch_start", PeftDetectionTrainer._epoch_started),
                          ("on_train_batch_start", PeftDetectionTrainer._batch_started),
                          ("on_pretrain_routine_end", PeftDetectionTrainer._set_distillation)):
            if fn not in self.callbacks[event]:  # DDP workers get the launcher's callbacks, these included
                self.add_callback(event, fn)

    @property
    def ema_tau(self) -> float | str | None:
        return self.peft.ema_tau  # the checkpoint's on resume (_adopt_checkpoint_spec)

    def _set_distillation(self) -> None:
        """Callback, after ``_setup_train`` copied the model into the EMA: the trained model's loss distills the
        untouched base (``peft.distill_base``); the EMA keeps Ultralytics' loss for its validation."""
        if self.peft.distill_base:
            model = unwrap_model(self.model)
            loss = BaseDistillLoss(model, self.peft.distill_base, keep_base=self.peft.keep_base,
                                   kind=self.peft.distill_kind)
            if RANK in {-1, 0}:
                LOGGER.info(f"visionpeft: distilling the untouched base's {DISTILL_KINDS[self.peft.distill_kind]} "
                            f"(weight {self.peft.distill_base:g}; loss item kd_loss)")
            if self.peft.distill_dreams:
                self._add_dreams(loss, model)
            model.criterion = loss

    def _add_dreams(self, loss: BaseDistillLoss, model: nn.Module) -> None:
        """Synthetic images of what the base knew (``peft.distill_dreams``), made once per run folder."""
        spec, t0 = self.peft, time.perf_counter()
        path = Path(self.save_dir) / "dreams.safetensors"
        images, made = load_or_dream(loss.teacher, path, spec.distill_dreams, int(self.args.imgsz), spec.dream_steps,
                                     int(self.args.seed), json.dumps(model.visionpeft["fingerprint"], sort_keys=True),
                                     objects=spec.dream_objects)
        loss.set_dreams(images.to(self.device), weight=spec.dream_weight, augment=spec.dream_augment,
                        seed=int(self.args.seed))
        if RANK in {-1, 0}:
            how = f"made in {time.perf_counter() - t0:.0f} s" if made else "read"
            views = ", a new zoomed and flipped view each step" if spec.dream_augment else ""
            what = f" and {spec.dream_objects} of its classes each" if spec.dream_objects else ""
            LOGGER.info(f"visionpeft: {len(images)} synthetic images of the base's BatchNorm statistics{what} ({how}, "
                        f"'{path}') distilled beside each batch (weight {loss.dream_weight:g}{views})")

    # -- run folder --------------------------------------------------------------------------------------------
    def check_resume(self, overrides) -> None:
        """Ultralytics settles the args (the checkpoint's on resume) here, first thing in ``BaseTrainer.__init__``,
        which then writes ``args.yaml`` and deletes a stale ``results.csv`` in the run folder: lock it first."""
        super().check_resume(overrides)
        if RANK in {-1, 0}:  # under DDP, rank 0 holds it (the launcher lets it go: ddp.prepare_launch)
            self.lock = runlock.lock_run_folder(self.args)

    def train(self) -> None:
        try:
            if self.ddp:  # this process launches the DDP workers (device=0,1,...)
                ddp.prepare_launch(self)
            super().train()
        finally:
            runlock.release(self.lock)

    # -- data --------------------------------------------------------------------------------------------------
    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if mode == "train":
            self._passes = resume_state.record_passes(loader)
        return loader

    # -- model -------------------------------------------------------------------------------------------------
    def setup_model(self):
        """Mirrors ``BaseTrainer.setup_model`` for a fresh run from a ``.pt`` base, loading it with visionpeft's
        restricted unpickler instead of Ultralytics' ``load_checkpoint`` (``weights_only=False``), so a base file
        cannot run code. Resume (``last.pt``, a file this trainer wrote) and the other cases stay Ultralytics'."""
        if self.resume or isinstance(self.model, nn.Module) or not str(self.model).lower().endswith(".pt"):
            if RANK != -1 and isinstance(self.model, nn.Module):  # a DDP worker, given the launcher's model
                self._adopt_model_spec(self.model)
            ckpt = super().setup_model()
        else:
            weights = load_base(self.model)
            self.model = self.get_model(cfg=weights.yaml, weights=weights, verbose=RANK in {-1, 0})
            ckpt = None
            self.on_model_setup()  # as TrainerHooks.setup_model does after Ultralytics' setup_model
        if RANK != -1:  # a DDP worker: Ultralytics' _setup_train wraps the model next
            ddp.ignore_frozen(self.model)
        return ckpt

    def _adopt_model_spec(self, model: nn.Module) -> None:
        """A DDP worker is built without ``peft=``: it trains the spec the launcher injected (ddp.prepare_launch)."""
        saved = getattr(model, STATE_ATTR, {}).get(SPEC_KEY)
        if saved is not None and not self._peft_given:
            self.peft = PeftSpec.from_dict(saved)

    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> DetectionModel:
        if weights is not None and hasattr(weights, STATE_ATTR):  # resume (last.pt), or adapters injected by hand
            model = copy.deepcopy(weights).float()
            state = model.visionpeft
            if self.resume:
                self._adopt_checkpoint_spec(state)
            elif not self._peft_given and state.get("active"):
                self.peft = replace(self.peft, adapter_name=state["active"])
            self._restore_base(model)
            name = self.peft.adapter_name
            if name in state["adapters"]:
                set_adapter(model, name)
            else:
                self.peft.inject(model, self.data["names"], self._run_configs())
                self._init_from_data(model)
        else:
            base = (copy.deepcopy(weights).float() if weights is not None
                    else build_detector(cfg, nc=self.data["nc"], ch=self.data["channels"]))
            configs = self._run_configs()
            plan = self._plan_ranks(base, configs) if self.peft.budget is not None else None
            model = self.peft.inject(base, self.data["names"], plan.configs if plan else configs)
            self._init_from_data(model)
            if plan is not None:  # adapter files record the budget; the ranks are in the configs' rank_pattern
                model.visionpeft["adapters"][self.peft.adapter_name]["budget"] = plan.record()
            if str(self.args.model).endswith(".pt"):
                model.visionpeft["base"] = str(Path(self.args.model).resolve())
        model.visionpeft[SPEC_KEY] = self.peft.to_dict()
        if verbose:
            LOGGER.info(f"visionpeft adapter '{self.peft.adapter_name}':\n{trainable_report(model)}")
            if self.peft.keep_scale != 1 or self.peft.keep_scale_pattern:
                by = ", ".join(f"{p}: {f:g}" for p, f in self.peft.keep_scale_pattern.items())
                LOGGER.info(f"visionpeft: best.safetensors holds the adapter scaled by {self.peft.keep_scale:g}"
                            f"{f' ({by})' if by else ''} toward the base where the base classes read it "
                            "(peft.keep_scale, keep_scale_pattern); the validation "
                            "here scores the adapter as trained")
            if self.peft.file_bits != 16:
                LOGGER.info(f"visionpeft: best.safetensors stores the low-rank factors in {self.peft.file_bits}-bit "
                            "blocks (peft.file_bits); Ultralytics' validation here scores them unrounded")
        # Ultralytics' _setup_train warns once per frozen parameter and unfreezes it anyway; build_optimizer
        # freezes again, before any backward pass.
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _run_configs(self) -> list[dict]:
        """The spec's method configs for this run's train split: a method whose ``min_images`` the split does not
        reach is left out. The rule depends on the data, so its outcome is printed at the start of training."""
        spec = self.peft
        if not any(m.get("min_images", 0) for m in spec.methods):
            return spec.configs()
        with streams_kept():
            images = train_images(self)
        for m in spec.methods:
            if m.get("min_images", 0):
                verdict = "trains" if images >= m["min_images"] else "left out"
                LOGGER.info(f"visionpeft: {m['method']} {verdict}: {images} train images, min_images "
                            f"{m['min_images']}")
        return spec.configs(images)

    def _plan_ranks(self, base: nn.Module, configs: list[dict]) -> RankPlan:
        """Ranks per layer for ``peft.budget``, from the gradients of a few train batches (``rank_plan``)."""
        spec = self.peft
        with streams_kept():  # the probe leaves every random stream of the run as it was (Python's included)
            losses = probe_losses(self) if spec.rank_plan == "gradient" else None
            plan = plan_ranks(base, configs, spec.budget, losses, spec.rank_plan, self.data["names"],
                              bits=spec.file_bits)
        LOGGER.info(f"visionpeft: {plan.summary()}")
        return plan

    def _init_from_data(self, model: nn.Module) -> None:
        """``init: eva`` adapters start from their layers' inputs on 64 unaugmented train images. Every random
        stream is left as it was, so the run draws the same batches and augmentations as with the zero init."""
        if not any(c.get("init") == "eva" for c in self.peft.configs()):
            return
        with streams_kept():
            layers = init_from_data(model, probe_images(self))
        LOGGER.info(f"visionpeft: init eva: {layers} adapters start along their inputs' principal directions")

    def _adopt_checkpoint_spec(self, state: dict) -> None:
        """On resume, the adapter recipe and LR multiplier are the checkpoint's, not whatever was passed now."""
        saved = state.get(SPEC_KEY)
        if saved is None:
            if state.get("active"):
                self.peft = replace(self.peft, adapter_name=state["active"])
            return
        spec = PeftSpec.from_dict(saved)
        if self._peft_given and spec != self.peft:
            LOGGER.warning("visionpeft: resume continues with the checkpoint's peft settings "
                           f"{spec.to_dict()}, not {self.peft.to_dict()}.")
        self.peft = spec

    def _restore_base(self, model: nn.Module) -> None:
        """Put back the fp32 base weights that an fp16 ``last.pt`` rounded, from the base file if it still fits."""
        source = model.visionpeft.get("base")
        if not source:
            return
        if not Path(source).is_file() and not str(source).startswith("vitdet:"):  # a ViT detector spec rebuilds it
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
        ddp.forget_ignored(unwrap_model(model))  # DDP (wrapped by now) keeps its own copy
        self.trainable = trainable_report(unwrap_model(model))
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        mults = self.lr_multipliers(unwrap_model(model))
        groups, sizes = [], {}
        for group in optimizer.param_groups:  # Ultralytics' groups (decayed weights, norm weights, biases), each
            params = [p for p in group["params"] if p.requires_grad]  # split by learning-rate multiplier
            for mult in sorted({mults[id(p)] for p in params}):
                chosen = [p for p in params if mults[id(p)] == mult]
                groups.append({**group, "params": chosen, "lr": group["lr"] * mult})
                sizes[mult] = sizes.get(mult, 0) + sum(p.numel() for p in chosen)
        optimizer.param_groups.clear()
        for group in groups:  # add_param_group keeps the optimizer's per-group defaults and checks for overlaps
            optimizer.add_param_group(group)
        rates = ", ".join(f"x{m:g} for {n:,}" for m, n in sorted(sizes.items()))
        LOGGER.info(f"visionpeft: optimizer gets {sum(sizes.values()):,} trainable parameters (lr {rates})")
        return optimizer

    def lr_multipliers(self, model: nn.Module) -> dict[int, float]:
        """``id(parameter)`` -> multiplier of Ultralytics' learning rate: ``lr_mult``, times ``loraplus_lr_ratio``
        for LoRA/DoRA up-projections (``lora_B``, LoRA+), or ``full_lr_mult`` for what trains in full."""
        spec = self.peft
        mults = {id(p): spec.lr_mult * (spec.loraplus_lr_ratio if ".lora_B." in n else 1.0)
                 for n, p in model.named_parameters() if p.requires_grad}
        if spec.full_lr_mult is not None:
            mults.update({id(p): spec.full_lr_mult for p in full_trained_parameters(model)})
        return mults

    @property
    def accumulate(self) -> int:
        """Batches per optimizer step. Ultralytics' ``_do_train`` steps when ``ni - last_opt_step >= accumulate``,
        ``last_opt_step`` a local that a resumed run starts at -1; until its first step, the interrupted run's
        last step is added, so the resumed run steps on the batches the uninterrupted run would."""
        return self._accumulate + (0 if self._resume_gate is None else self._resume_gate + 1)

    @accumulate.setter
    def accumulate(self, value: int) -> None:
        self._accumulate = value

    def optimizer_step(self) -> None:
        self._last_opt_step = self._batch_i + len(self.train_loader) * self.epoch  # Ultralytics' `ni`
        self._resume_gate = None
        super().optimizer_step()

    def _batch_started(self) -> None:
        self._batch_i += 1
        loss = getattr(unwrap_model(self.model), "criterion", None)
        if isinstance(loss, BaseDistillLoss):  # dreams in turn by Ultralytics' `ni`, so a resumed run takes the same
            loss.dream_step = self._batch_i + len(self.train_loader) * self.epoch

    def _epoch_started(self) -> None:
        """Callback: on the first resumed epoch, put back the random streams and gradients of the interrupted
        run, after Ultralytics' ``optimizer.zero_grad()`` and before the first batch is drawn."""
        self._batch_i = -1
        if self._resume_streams is not None and self.epoch == self.start_epoch:
            tensors, meta = self._resume_streams
            self._resume_streams = None
            self._resume_albumentations = resume_state.restore_epoch_start(self, tensors, meta, self._passes)
            self._last_opt_step = self._resume_gate = meta["last_opt_step"]

    def on_mosaic_closed(self) -> None:
        saved, self._resume_albumentations = self._resume_albumentations, None
        if saved is not None:  # the interrupted run's augmentation streams, onto the transforms just rebuilt
            resume_state.restore_albumentations(self.train_loader.dataset.transforms, saved)

    def on_model_train(self) -> None:
        for m in frozen_norm_modules(unwrap_model(self.model)):
            m.eval()

    # -- checkpoints -------------------------------------------------------------------------------------------
    def resume_training(self, ckpt) -> None:
        super().resume_training(ckpt)
        if ckpt is None or not self.resume:
            return
        model = unwrap_model(self.model)  # its base was restored in get_model
        targets = [model, self.ema.ema] if self.ema else [model]
        if self.ema:  # the EMA came back from fp16 too
            copy_base_tensors(self.ema.ema, model)
        self._load_fp32_adapter(Path(self.args.model).with_suffix(".safetensors"), int(ckpt["epoch"]), targets)
        self._load_train_state(resume_state.state_path(self.args.model), int(ckpt["epoch"]), model)

    def _load_train_state(self, path: Path, epoch: int, model: nn.Module) -> None:
        """The trained model's fp32 adapter and optimizer state now; the random streams at the first epoch."""
        try:
            tensors, meta = resume_state.read(path)
        except ValueError as e:
            LOGGER.warning(f"visionpeft: {e}; the resumed run continues from the EMA weights with fresh random "
                           "streams, so it will not repeat the uninterrupted run exactly.")
            return
        if meta.get("epoch") != epoch:
            LOGGER.warning(f"visionpeft: '{path}' is of epoch {meta.get('epoch')}, the checkpoint of epoch {epoch}; "
                           "the resumed run will not repeat the uninterrupted run exactly.")
            return
        resume_state.restore_weights(tensors, model, self.peft.adapter_name, self.optimizer)
        self._resume_streams = tensors, meta

    def _load_fp32_adapter(self, path: Path, epoch: int, targets: list[nn.Module]) -> None:
        """Replace the checkpoint's fp16-rounded adapter by the fp32 file saved with it (same epoch only)."""
        name = self.peft.adapter_name
        try:
            tensors, meta = read_adapter(path)
        except AdapterFileError as e:
            LOGGER.warning(f"visionpeft: {e} Resuming with the checkpoint's fp16 adapter.")
            return
        if meta.get("epoch") != epoch or meta.get("adapter_name") != name:
            LOGGER.warning(f"visionpeft: '{path}' holds adapter '{meta.get('adapter_name')}' of epoch "
                           f"{meta.get('epoch')}, the checkpoint epoch {epoch}; resuming with the checkpoint's.")
            return
        for m in targets:
            load_adapter_tensors(m, tensors, name)
        LOGGER.info(f"visionpeft: resumed the fp32 adapter of epoch {epoch + 1} from '{path}'")

    def on_nan_recovered(self) -> None:
        """Ultralytics reloaded the model from the fp16 ``last.pt``; put the fp32 base back."""
        model = unwrap_model(self.model)
        self._restore_base(model)
        if self.ema:
            copy_base_tensors(self.ema.ema, model)

    def _deliverable(self, model: nn.Module) -> nn.Module:
        """The adapter ``best.safetensors`` holds: as trained, or scaled toward the base (``peft.keep_scale``)."""
        if self.peft.keep_scale == 1 and not self.peft.keep_scale_pattern:
            return model
        return scale_adapter(copy.deepcopy(model), self.peft.keep_scale, pattern=self.peft.keep_scale_pattern)

    def save_model(self) -> bool:
        """Ultralytics' checkpoints, written atomically, plus the float32 adapter files beside them."""
        last, best = self.last, self.best
        tmp_last, tmp_best = last.with_name(f".{last.name}.tmp"), best.with_name(f".{best.name}.tmp")
        for tmp in (tmp_last, tmp_best):  # left by a run killed while saving
            tmp.unlink(missing_ok=True)
        self.last, self.best = tmp_last, tmp_best
        try:
            saved = super().save_model()
        finally:
            self.last, self.best = last, best
        is_best = tmp_best.exists()
        extra = {"epoch": self.epoch, "fitness": None if self.fitness is None else float(self.fitness)}
        save_adapter(self.ema.ema, last.with_suffix(".safetensors"), extra=extra)
        state = resume_state.capture(self, unwrap_model(self.model), self._last_opt_step, self._passes)
        resume_state.save(resume_state.state_path(last), state)
        os.replace(tmp_last, last)
        if is_best:
            # the per-task deliverable, in fp16 like Ultralytics' best.pt; last.safetensors stays fp32 for resume
            bits = None if self.peft.file_bits == 16 else self.peft.file_bits
            save_adapter(self._deliverable(self.ema.ema), best.with_suffix(".safetensors"), extra=extra,
                         dtype=torch.float16, bits=bits)
            os.replace(tmp_best, best)
        return saved

