"""The boundary with Ultralytics: every private or version-specific Ultralytics name visionpeft relies on.

Underscore methods overridden or called, module globals replaced, lists copied, class swaps, ``Detect.legacy`` and
``pt_path`` are used here and nowhere else in visionpeft (``tests/test_ultralytics_boundary.py`` checks it), each
with a comment naming the Ultralytics code it mirrors, so an Ultralytics upgrade is reviewed in this one file.
``SUPPORTED`` is the range these were checked against; :func:`check_version` enforces it at ``import visionpeft``.

Imports only the standard library, torch and ultralytics (never other visionpeft modules), so every layer may
import it. Ultralytics is imported inside the functions: the version check runs without importing it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

MIN_VERSION = "8.4.180"  # the lowest version CI tests (.ci/run); pyproject.toml declares the same range
BELOW_VERSION = "8.5"  # the first release series not tested
SUPPORTED = f">={MIN_VERSION},<{BELOW_VERSION}"

# What Ultralytics lets a resumed run change: the `allowed` set inside engine.trainer.BaseTrainer.check_resume (a
# local there, so copied; tests/test_ultralytics_boundary.py compares it with the installed source).
RESUME_ARGS = frozenset({"imgsz", "batch", "device", "close_mosaic", "augmentations", "save_period", "workers",
                         "cache", "patience", "time", "freeze", "val", "plots", "channels_last", "distill_model",
                         "save_dir"})


# -- version ------------------------------------------------------------------------------------------------------
def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"8.4.190.dev0"`` -> ``(8, 4, 190)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"Not a version: {version!r}")
    return tuple(int(p) for p in match.group().split("."))


def is_supported(version: str) -> bool:
    """Whether Ultralytics ``version`` is in :data:`SUPPORTED`."""
    return _release(MIN_VERSION) <= _release(version) < _release(BELOW_VERSION)


def installed_version() -> str | None:
    """The version of the Ultralytics that ``import ultralytics`` finds (its distribution metadata), or None."""
    try:
        return importlib.metadata.version("ultralytics")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(version: str | None = None) -> None:
    """One-line ``ImportError`` when the installed Ultralytics (or ``version``) is outside :data:`SUPPORTED`.

    Without Ultralytics installed nothing is raised: ``python -m visionpeft.edge`` needs none, and every other use
    fails at ``import ultralytics`` with Python's own error.
    """
    version = installed_version() if version is None else version
    if version is not None and not is_supported(version):
        raise ImportError(f"visionpeft supports ultralytics{SUPPORTED}; found {version}: "
                          f"pip install 'ultralytics{SUPPORTED}'")


# -- checkpoints --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def restricted_builds() -> Iterator[None]:
    """Ultralytics' restricted model building: ``parse_model`` resolves a YAML's ``activation`` without ``eval``
    and accepts only ``nn.Module`` layers. Mirrors the thread flag ``ultralytics.nn.tasks._SafeLoad.loading`` sets
    (without its process-wide allow-list): a model class allowed in a checkpoint can be *called* by the pickle
    (REDUCE) with a crafted config, and a model YAML is a file a user may receive."""
    from ultralytics.nn import tasks

    safe = getattr(tasks, "_SafeLoad", None)
    if safe is None or not getattr(safe, "SUPPORTED", False):
        import ultralytics

        raise RuntimeError(f"Ultralytics {ultralytics.__version__} (or torch {torch.__version__}) has no restricted "
                           "model loading; upgrade both (pip install -U ultralytics torch) to load Ultralytics models.")
    previous = getattr(safe._local, "active", False)
    safe._local.active = True
    try:
        yield
    finally:
        safe._local.active = previous


def restricted_getattr(obj: Any, name: str) -> Any:
    """``builtins.getattr`` as some Ultralytics checkpoints pickle it (``Detect.forward``), limited to layer
    attributes; mirrors ``_getattr`` in ``ultralytics.nn.tasks._SafeLoad._build``."""
    import pickle

    if isinstance(obj, type) and issubclass(obj, nn.Module) and not name.startswith("__"):
        return getattr(obj, name)
    if isinstance(obj, nn.Module) and name in {"forward", "forward_fuse"}:
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not allowed in a checkpoint")


def legacy_checkpoint_globals() -> dict[str, object]:
    """Globals old Ultralytics checkpoints name that no longer exist there, and what they stand for now: the
    detector entries of ``temporary_modules`` in ``ultralytics.nn.tasks.torch_safe_load`` (and of
    ``_SafeLoad._build``), plus its ``getattr`` (:func:`restricted_getattr`)."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    return {
        "builtins.getattr": restricted_getattr,
        "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "ultralytics.nn.modules.block.Silence": nn.Identity,  # YOLOv9e
        "ultralytics.nn.tasks.YOLOv10DetectionModel": DetectionModel,
    }


def prepare_loaded_model(model: nn.Module, train_args: dict | None, path: str | Path) -> nn.Module:
    """A checkpoint's model prepared as ``ultralytics.nn.tasks.load_checkpoint`` (8.4) prepares it after
    ``torch_safe_load``: float32, eval, ``args``, ``pt_path``, ``task``, ``stride``, in-place layers."""
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT

    model = model.float()
    model.args = {**DEFAULT_CFG_DICT, **(train_args or {})}
    model.pt_path = str(path)
    model.task = getattr(model, "task", None) or guess_model_task(model)
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model.eval()


# -- model file name (pt_path) ------------------------------------------------------------------------------------
def checkpoint_path(model: nn.Module) -> str | None:
    """The file a model was loaded from: ``pt_path``, set by ``load_checkpoint`` and read by ``Model._load``."""
    return getattr(model, "pt_path", None)


def set_export_name(model: nn.Module, path: str | Path) -> None:
    """Make Ultralytics' exporter name its output after ``path`` (``<stem>.onnx``, ``<stem>_openvino_model/``
    beside it): ``Exporter.__call__`` derives its file from ``model.pt_path``."""
    model.pt_path = str(path)


def forget_checkpoint_path(model: nn.Module) -> None:
    """Drop ``pt_path`` from a model built from another (it names a file this model does not come from)."""
    model.__dict__.pop("pt_path", None)


# -- model classes ------------------------------------------------------------------------------------------------
def retype(model: nn.Module, cls: type) -> None:
    """Turn a model Ultralytics built (``load_checkpoint``, ``parse_model``) into ``cls`` in place: a
    ``DetectionModel`` subclass adding methods only, or back, so the state ``DetectionModel.__init__`` set up fits."""
    model.__class__ = cls


def modern_detect_head(nc: int, ch: list[int], reg_max: int = 16, end2end: bool = False) -> nn.Module:
    """A YOLO11-style ``Detect`` head (depthwise class branch) regardless of what YAML was parsed last.

    ``Detect.legacy`` is a class attribute that ``ultralytics.nn.tasks.parse_model`` sets process-wide (True for
    v3/v5/v8/v9 YAMLs); pin it while building, and on the head.
    """
    from ultralytics.nn.modules import Detect

    saved = Detect.legacy
    Detect.legacy = False
    try:
        head = Detect(nc=nc, reg_max=reg_max, end2end=end2end, ch=ch)
    finally:
        Detect.legacy = saved
    head.legacy = False
    return head


class LayerRouting:
    """Mixin for a ``DetectionModel`` whose layers may read something other than earlier outputs: its forward
    pass is ``BaseModel._predict_once`` (``ultralytics.nn.tasks``, 8.4) with the choice of a layer's input in
    :meth:`layer_input`."""

    def layer_input(self, m: nn.Module, x: Any, y: list, image: torch.Tensor) -> Any:
        """The input of layer ``m``: ``x`` (the previous output), or the saved outputs ``y`` its ``f`` names."""
        if m.f != -1:  # if not from previous layer
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        return x

    # Mirrors ultralytics.nn.tasks.BaseModel._predict_once, with layer_input in place of its routing line
    def _predict_once(self, x, profile=False, embed=None):
        image, y, dt, embeddings = x, [], [], []
        embed = frozenset(embed) if embed else {-1}
        max_idx = max(embed)
        for m in self.model:
            x = self.layer_input(m, x, y, image)
            if profile:
                self._profile_one_layer(m, x, dt)
            x = m(x)
            y.append(x if m.i in self.save else None)
            if m.i in embed:
                embeddings.append(nn.functional.adaptive_avg_pool2d(x, (1, 1)).squeeze(-1).squeeze(-1))
                if m.i == max_idx:
                    return torch.unbind(torch.cat(embeddings, 1), dim=0)
        return x


# -- ultralytics.engine.model.Model ----------------------------------------------------------------------------
class DetectorSource:
    """Mixin for ``ultralytics.engine.model.Model`` (``YOLO``) whose model comes from :meth:`load_model` instead
    of Ultralytics' loaders. ``Model.__init__`` calls ``_new`` for a YAML and ``_load`` for anything else; both
    set the attributes ``Model._load`` sets (8.4: ``model``, ``ckpt``, ``task``, ``ckpt_path``, ``overrides``,
    ``model_name``)."""

    def load_model(self, source: str) -> tuple[nn.Module, str | None]:
        """The detector for ``source`` (what ``Model.__init__`` was given) and the file it comes from."""
        raise NotImplementedError(f"{type(self).__name__} must define load_model")

    # Mirrors ultralytics.engine.model.Model._load (called by Model.__init__)
    def _load(self, weights: str, task: str | None = None) -> None:
        model, ckpt_path = self.load_model(weights)
        self.model = model
        self.ckpt, self.task = {}, "detect"
        self.ckpt_path = ckpt_path
        self.overrides = {"task": "detect", "model": ckpt_path or type(model).__name__}
        self.model_name = ckpt_path

    # Mirrors ultralytics.engine.model.Model._new (called by Model.__init__ for a YAML); `model` as in 8.3
    def _new(self, cfg: str, task: str | None = None, model: Any = None, verbose: bool = False) -> None:
        self._load(cfg, task)
        self.cfg = cfg


# -- ultralytics.engine.trainer.BaseTrainer ------------------------------------------------------------------------
class TrainerHooks:
    """Mixin for ``DetectionTrainer``: the private steps of ``BaseTrainer._do_train`` (8.4) visionpeft extends, as
    public hooks. Put it before the trainer class in the bases."""

    #: ``channels_last=True`` on a CPU device, which Ultralytics ignores: ``on_model_setup`` converts the model then
    cpu_channels_last: bool = False

    def setup_train_context(self) -> contextlib.AbstractContextManager:
        """A context around ``_setup_train`` (model to device, AMP check, data loaders, optimizer)."""
        return contextlib.nullcontext()

    def on_mosaic_closed(self) -> None:
        """After ``_close_dataloader_mosaic`` rebuilt the train transforms without mosaic."""

    def on_model_train(self) -> None:
        """After ``_model_train`` put the model in train mode, at each epoch's start."""

    def on_nan_recovered(self) -> None:
        """After ``_handle_nan_recovery`` reloaded the model from ``last.pt``."""

    def on_model_setup(self) -> None:
        """After ``setup_model`` built ``self.model``, before ``_setup_train`` makes its EMA and optimizer."""

    # Mirrors the call in ultralytics.engine.trainer.BaseTrainer._do_train. Its channels_last step converts the model
    # on CUDA only and warns "ignoring" on CPU: on CPU the trainer converts it itself (cpu_channels_last, in
    # setup_model), so the flag is hidden from that step meanwhile.
    def _setup_train(self) -> None:
        self.cpu_channels_last = self.args.channels_last is True and self.device.type == "cpu"
        if self.cpu_channels_last:
            self.args.channels_last = None
        try:
            with self.setup_train_context():
                super()._setup_train()
        finally:
            if self.cpu_channels_last:
                self.args.channels_last = True

    # BaseTrainer.setup_model (public): called first thing in _setup_train
    def setup_model(self) -> Any:
        ckpt = super().setup_model()
        self.on_model_setup()
        return ckpt

    # Called by BaseTrainer._do_train at epoch `epochs - close_mosaic`; on resume, at the first epoch past it
    def _close_dataloader_mosaic(self) -> None:
        super()._close_dataloader_mosaic()
        self.on_mosaic_closed()

    # Called by BaseTrainer._do_train at each epoch's start
    def _model_train(self) -> None:
        super()._model_train()
        self.on_model_train()

    # BaseTrainer._handle_nan_recovery(epoch) -> whether it reloaded last.pt
    def _handle_nan_recovery(self, epoch) -> bool:
        recovered = super()._handle_nan_recovery(epoch)
        if recovered:
            self.on_nan_recovered()
        return recovered


@contextlib.contextmanager
def amp_check_replaced(check: Callable[[nn.Module], bool]) -> Iterator[None]:
    """Inside, ``BaseTrainer._setup_train`` runs ``check(model)`` instead of ``ultralytics.utils.checks.check_amp``:
    it calls the name ``ultralytics.engine.trainer`` imported, a module global replaced here."""
    import ultralytics.engine.trainer as engine

    original = engine.check_amp
    engine.check_amp = check
    try:
        yield
    finally:
        engine.check_amp = original


def loader_batch_sampler(loader: Any) -> Any:
    """The ``BatchSampler`` of an Ultralytics train loader, or None: ``InfiniteDataLoader`` (``ultralytics.data.
    build``) wraps it in a ``_RepeatSampler``, its ``batch_sampler``, as ``.sampler``."""
    return getattr(getattr(loader, "batch_sampler", None), "sampler", None)
