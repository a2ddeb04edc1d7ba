"""Multi-GPU training through Ultralytics' own DDP launch (``device=0,1``), adapters only.

``BaseTrainer.train`` (the launching process) calls ``ultralytics.utils.dist.generate_ddp_command``: it deletes the
run folder (fresh runs), cloudpickles ``type(trainer)``, ``vars(trainer.args)``, ``trainer.model`` and
``trainer.callbacks``, and starts ``torch.distributed.run`` on a file that rebuilds the trainer from them, without
the ``peft=`` argument, on every rank. So, before the launch (:func:`prepare_launch`):

* the launcher builds the PEFT model (a fresh run): the pickled model carries the spec (``visionpeft["train"]``)
  and one adapter initialisation, which every rank then starts from; a resumed run's workers read both from
  ``last.pt``, as a single-GPU resume does;
* files visionpeft wrote into the run folder (``visionpeft.yaml``) travel in a callback that rank 0 writes back;
* the launcher gives up its run-folder lock; rank 0 takes it (``PeftDetectionTrainer.check_resume``).

In each worker, :func:`ignore_frozen` hides the base from DDP, so only adapter tensors are broadcast and all-reduced
(Ultralytics' ``_setup_train`` sets ``requires_grad`` on every parameter just before it wraps the model).
Checkpoints, adapter files and the resume state are written by rank 0 only (Ultralytics calls ``save_model`` there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.utils import RANK

from ..inject import STATE_ATTR, trainable_parameter_names, trainable_report
from ..io import atomic_write_bytes
from . import runlock

IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # read by torch.nn.parallel.DistributedDataParallel.__init__


class RestoreRunFiles:
    """Callback (``on_pretrain_routine_start``, run by rank 0 in ``BaseTrainer.__init__``): writes back the files
    that ``generate_ddp_command`` deleted with the run folder. Picklable, so it reaches the workers."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def __call__(self, trainer: Any) -> None:
        if RANK in {-1, 0}:
            for name, data in self.files.items():
                if not (Path(trainer.save_dir) / name).exists():
                    atomic_write_bytes(Path(trainer.save_dir) / name, data)


def prepare_launch(trainer: Any) -> None:
    """In the launching process, right before Ultralytics generates the DDP file (see the module docstring)."""
    if not trainer.resume and not isinstance(trainer.model, nn.Module):
        trainer.setup_model()  # the PEFT model, spec and adapter init included, pickled for every rank
        model = trainer.model
        frozen = {n: p.requires_grad for n, p in model.named_parameters()}
        trainable = trainable_parameter_names(model)
        for n, p in model.named_parameters():  # for the launcher's summary; the workers freeze for real
            p.requires_grad_(n in trainable)
        trainer.trainable = trainable_report(model)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    save_dir = Path(trainer.save_dir)
    if not trainer.resume:  # generate_ddp_command deletes the run folder of a fresh run
        keep = {"args.yaml", runlock.LOCK_NAME}  # rank 0 writes both again
        files = {p.name: p.read_bytes() for p in save_dir.iterdir() if p.is_file() and p.name not in keep} \
            if save_dir.is_dir() else {}
        if files:
            trainer.add_callback("on_pretrain_routine_start", RestoreRunFiles(files))
    runlock.release(trainer.lock)  # rank 0 of the workers locks the run folder for the run
    trainer.lock = None


def ignore_frozen(model: nn.Module) -> None:
    """Let DDP sync only the active adapter: every other parameter, and every base buffer, is ignored.

    Set on the unwrapped model before Ultralytics' ``_setup_train`` wraps it in ``DistributedDataParallel``
    (the attribute that ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` sets, without the
    per-tensor flags, which would be pickled into the checkpoints); :func:`forget_ignored` removes it once wrapped.
    """
    if not hasattr(model, STATE_ATTR):
        return
    trainable = trainable_parameter_names(model)
    names = [n for n, _ in model.named_parameters() if n not in trainable]
    names += [n for n, _ in model.named_buffers() if ".adapters." not in n]
    setattr(model, IGNORE_ATTR, names)


def forget_ignored(model: nn.Module) -> None:
    """Drop :func:`ignore_frozen`'s list (DDP copied it), so the EMA and checkpoints do not carry it."""
    model.__dict__.pop(IGNORE_ATTR, None)
