"""What a resumed run needs, besides Ultralytics' ``last.pt``, to continue exactly as if it had never stopped.

Ultralytics resumes from ``last.pt``: the EMA (fp16), the optimizer (fp16, Adam moments excepted), epoch and best
fitness. The resumed run then trains on from the EMA's weights, with freshly seeded random generators, a fresh
shuffle and an empty mosaic buffer, and steps the optimizer at once whatever gradients it had accumulated, so it
drifts from the run it continues. ``weights/last.state.safetensors``, written beside ``last.pt`` at each save,
holds the rest:

* the trained model's adapter tensors in fp32 (the EMA's are in ``last.safetensors``), the gradients accumulated
  since the last optimizer step, the optimizer's state tensors in fp32, and that step's batch index;
* the random generators: torch (CPU and CUDA), numpy and ``random`` (mosaic, affine, HSV, flips), each
  albumentations transform's own pair, and the shuffle generator of the train loader (Ultralytics'
  ``build_dataloader`` gives the loader a seeded ``torch.Generator``; its ``RandomSampler`` draws each epoch's
  order from it);
* the dataset's mosaic buffer (the indices of recently loaded images that mosaic picks partners from).

The file is data (safetensors tensors plus JSON metadata), never pickle. Restoring is exact with ``workers=0``,
which Ultralytics forces on CPU: worker processes keep random streams of their own that cannot be saved, so with
workers a resumed run gets the same shuffle but different augmentations.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from ..integrations.ultralytics import loader_batch_sampler
from ..io import adapter_state_dict, atomic_write_bytes, load_adapter_tensors

FORMAT = "visionpeft.train_state.v1"


def state_path(last: str | Path) -> Path:
    """``weights/last.state.safetensors`` for ``weights/last.pt``."""
    return Path(last).with_suffix(".state.safetensors")


class PassRecorder(Sampler):
    """Wraps the train loader's ``RandomSampler``: keeps its generator's state at the start of each pass (one
    pass is one epoch of Ultralytics' ``InfiniteDataLoader``), and sets a given state before the next pass."""

    def __init__(self, sampler: RandomSampler) -> None:
        self.sampler = sampler
        self.start_state = sampler.generator.get_state()
        self.next_start: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        if self.next_start is not None:
            self.sampler.generator.set_state(self.next_start)
            self.next_start = None
        self.start_state = self.sampler.generator.get_state()
        yield from self.sampler

    def state_after_pass(self, start_state: torch.Tensor) -> torch.Tensor:
        """The generator's state once a whole pass started at ``start_state`` has been drawn: where the next pass
        starts (the sampler's draws replayed on a copy of the generator)."""
        replica = copy.copy(self.sampler)
        replica.generator = torch.Generator()
        replica.generator.set_state(start_state)
        for _ in replica:
            pass
        return replica.generator.get_state()


def record_passes(loader: Any) -> PassRecorder | None:
    """Put a :class:`PassRecorder` into a shuffling single-process train loader, in place.

    Ultralytics' ``InfiniteDataLoader`` iterates ``_RepeatSampler(BatchSampler(RandomSampler))``; DDP loaders use a
    ``DistributedSampler``, whose order is a function of the epoch already (``None`` then).
    """
    batches = loader_batch_sampler(loader)
    if isinstance(batches, BatchSampler) and isinstance(batches.sampler, RandomSampler) \
            and batches.sampler.generator is not None:
        batches.sampler = PassRecorder(batches.sampler)
        return batches.sampler
    return None


def _trainable(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _album_nodes(transforms: Any) -> list[Any]:
    """Every albumentations transform (composes included) in an Ultralytics transform pipeline, in a fixed order."""
    out, seen, stack = [], set(), [transforms]
    while stack:
        t = stack.pop(0)
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if hasattr(t, "py_random") and hasattr(t, "random_generator"):
            out.append(t)
        children = getattr(t, "transforms", None)
        stack.extend(children if isinstance(children, list) else [])
        stack.extend(getattr(t, a, None) for a in ("transform", "pre_transform"))
    return out


def capture_albumentations(transforms: Any) -> list[dict]:
    return [{"seed": t.seed, "np": t.random_generator.bit_generator.state, "py": t.py_random.getstate()}
            for t in _album_nodes(transforms)]


def restore_albumentations(transforms: Any, saved: list[dict]) -> None:
    """Put back the albumentations random states, if the pipeline has the structure it had when saved."""
    nodes = _album_nodes(transforms)
    if len(nodes) != len(saved) or any(type(t.random_generator.bit_generator).__name__ != s["np"]["bit_generator"]
                                       for t, s in zip(nodes, saved, strict=True)):
        from ultralytics.utils import LOGGER

        LOGGER.warning("visionpeft: the augmentation pipeline changed since the interrupted run; its "
                       "albumentations restart their random streams.")
        return
    for t, s in zip(nodes, saved, strict=True):
        t.seed = s["seed"]  # Ultralytics' Albumentations re-seeds a compose whose seed is not torch.initial_seed()
        t.random_generator = np.random.default_rng()
        t.random_generator.bit_generator.state = s["np"]
        t.py_random = random.Random()
        version, internal, gauss = s["py"]
        t.py_random.setstate((version, tuple(internal), gauss))


def capture(trainer: Any, model: nn.Module, last_opt_step: int, recorder: PassRecorder | None) -> bytes:
    """The state file's bytes for the end of ``trainer.epoch`` (``model``: the trained model, unwrapped)."""
    tensors = {f"model/{k}": v for k, v in adapter_state_dict(model).items()}
    for i, p in enumerate(_trainable(trainer.optimizer)):
        if p.grad is not None:
            tensors[f"grad/{i}"] = p.grad.detach().to("cpu", copy=True).contiguous()
        for name, v in trainer.optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{i}/{name}"] = v.detach().to("cpu", copy=True).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    if recorder is not None:
        tensors["loader/pass_start"] = recorder.start_state
        tensors["loader/now"] = recorder.sampler.generator.get_state()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    dataset = trainer.train_loader.dataset
    meta = {
        "format": FORMAT, "epoch": int(trainer.epoch), "last_opt_step": int(last_opt_step),
        "random": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "albumentations": capture_albumentations(getattr(dataset, "transforms", None)),
        "buffer": [int(i) for i in getattr(dataset, "buffer", [])],
    }
    return save_bytes(tensors, metadata={"visionpeft": json.dumps(meta)})


def save(path: str | Path, data: bytes) -> Path:
    return atomic_write_bytes(path, data)


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a state file; raises ``ValueError`` for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"'{path}' not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("visionpeft") or "{}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"'{path}' is not a readable state file ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a visionpeft training state file")
    missing = sorted({"epoch", "last_opt_step", "random", "numpy", "albumentations", "buffer"} - set(meta))
    if missing or "rng/torch" not in tensors:
        raise ValueError(f"'{path}' is incomplete (no {missing or ['rng/torch']})")
    return tensors, meta


def restore_weights(tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer) -> None:
    """The trained model's fp32 adapter, and the optimizer's fp32 state (``last.pt`` rounds SGD momentum)."""
    load_adapter_tensors(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, adapter_name)
    params = _trainable(optimizer)
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, i, name = key.split("/", 2)
            if int(i) >= len(params):
                continue
            p = params[int(i)]
            old = optimizer.state[p].get(name)
            optimizer.state[p][name] = v.to(old.device if isinstance(old, torch.Tensor) else p.device)


def restore_epoch_start(trainer: Any, tensors: dict[str, torch.Tensor], meta: dict,
                        recorder: PassRecorder | None) -> list[dict] | None:
    """At the first resumed epoch's start (``on_train_epoch_start``): random generators, gradients, mosaic buffer,
    shuffle and augmentation streams. Returns the albumentations states to put back once Ultralytics has rebuilt
    the transforms in ``_close_dataloader_mosaic``, if it does so now.

    ``_do_train`` starts a resumed run with ``mosaic_closed=False``, so a run past its ``close_mosaic`` epoch rebuilds
    the transforms (fresh albumentations) and the loader's iterator in its first epoch; the uninterrupted run did so
    once, at epoch ``max(epochs - close_mosaic, 0)``.
    """
    dataset = trainer.train_loader.dataset
    restore_streams(tensors, meta, trainer.optimizer, dataset)
    n_close, epoch = trainer.args.close_mosaic, trainer.epoch
    closes_now = bool(n_close) and epoch >= trainer.epochs - n_close
    if closes_now and epoch == max(trainer.epochs - n_close, 0):
        # Both runs rebuild here: fresh albumentations, and a new iterator that draws its seed from the shuffle
        # generator as the interrupted run left it, before this epoch's order.
        if recorder is not None and "loader/now" in tensors:
            recorder.sampler.generator.set_state(tensors["loader/now"])
        return None
    if recorder is not None and "loader/pass_start" in tensors:
        recorder.next_start = recorder.state_after_pass(tensors["loader/pass_start"])
    if closes_now:
        return meta["albumentations"]
    restore_albumentations(dataset.transforms, meta["albumentations"])
    return None


def restore_streams(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer,
                    dataset: Any) -> None:
    """Random generators, accumulated gradients and the mosaic buffer, right before the resumed epoch draws."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = meta["random"]
    random.setstate((version, tuple(internal), gauss))
    for i, p in enumerate(_trainable(optimizer)):
        g = tensors.get(f"grad/{i}")
        p.grad = None if g is None else g.to(p.device, p.dtype)
    buffer = meta.get("buffer") or []
    if buffer and all(hasattr(dataset, a) for a in ("buffer", "ims", "im_hw0", "im_hw", "load_image")):
        # Replay the loads: load_image keeps each image in memory and appends it to the buffer, as the run did.
        for i in dataset.buffer:
            dataset.ims[i] = dataset.im_hw0[i] = dataset.im_hw[i] = None
        dataset.buffer = []
        for i in buffer:
            if 0 <= i < len(dataset.ims):
                dataset.load_image(i)
