"""Training configs: one YAML (base model, dataset, PEFT recipe, augmentations, Ultralytics train args) plus
``key=value`` overrides, Ultralytics style. Every key is checked, so a typo fails before training, not after.

::

    model: yolo11n.pt          # base weights: a path, or a name in the assets' weights/
    data: crop_weed.yaml       # dataset YAML: a path, or a name in the repo's datasets/
    peft: {adapter_name: crops, methods: [{method: lora, r: 8, alpha: 16}], bn: frozen, lr_mult: 1.0}
    augmentations: [RandomBrightnessContrast: {p: 0.5}]   # albumentations, see visionpeft.train.augment
    train: {epochs: 30, imgsz: 320, batch: 16}            # any Ultralytics train argument

Overrides: ``epochs=3`` (a plain Ultralytics key goes to ``train:``), ``data=coco8.yaml`` (a section),
``peft.lr_mult=2`` or ``peft.methods.0.r=16`` (dotted paths into sections, list items by index).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from .. import settings
from ..budget import RANK_PLANS, check_plannable, parse_budget
from ..datasets import load_dataset
from ..inject import check_scale_pattern, inject
from ..keep_modes import SHARED_MODES, check_keep_base_mode
from ..methods import LoraConfig, config_from_dict
from ..paths import find_file, resolve_weights
from .augment import build_transforms, to_ultralytics
from .distill import check_distill_base, check_distill_kind
from .ema import check_ema_tau

CONFIGS_DIR = settings.ROOT / "configs"
SECTIONS = ("model", "data", "peft", "augmentations", "train")
DEFAULT_MODEL = "yolo11n.pt"
FILE_BITS = (16, 8, 4)  # peft.file_bits: float16, or blockquant's rounded factors
# Ultralytics keys that visionpeft sets itself, and where they go instead.
RESERVED_TRAIN_KEYS = {
    "model": "use the top-level 'model:' (or model=...)",
    "data": "use the top-level 'data:' (or data=...)",
    "augmentations": "use the top-level 'augmentations:' list",
    "task": "visionpeft trains detection ('detect')",
    "mode": "visionpeft runs Ultralytics in 'train' mode",
    "cfg": "pass the visionpeft config with --cfg",
}


class ConfigError(ValueError):
    """A config or override names an unknown key, or a value Ultralytics/visionpeft cannot use."""


def ultralytics_train_keys() -> list[str]:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return sorted(k for k in DEFAULT_CFG_DICT if k not in RESERVED_TRAIN_KEYS)


def _unknown(kind: str, key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return ConfigError(f"Unknown {kind} '{key}'.{hint} Valid keys: {sorted(valid)}.")


@dataclass
class PeftSpec:
    """What to train: adapter name, method configs (dicts as in YAML), BatchNorm policy, LR multiplier.

    ``bn``: ``"frozen"`` keeps BatchNorm weights and statistics of the base (eval mode); ``"train"`` gives each
    BatchNorm a trainable copy (affine and running statistics) saved with the adapter.
    ``lr_mult`` scales the learning rate Ultralytics picks (adapters often want more than full fine-tuning).
    ``full_lr_mult`` scales it for what trains in full instead (re-initialised class outputs, BatchNorm copies);
    ``None``: ``lr_mult`` as well. ``loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024; Hugging Face peft's name):
    LoRA/DoRA up-projections (``lora_B``) learn this many times faster than the rest of the adapter.
    ``keep_base``: the merged model keeps the base classes beside the new ones (base names first); the adapter
    trains as usual, and its lowest adapted layer (set with the methods' ``layers``) is where the merged model's
    branch leaves the base (:func:`visionpeft.inject.with_base`); ``"head"``: only the head is doubled, the adapted
    layers below it are shared by both heads (one trunk run; pair it with ``distill_base``); ``"classes"``: the
    adapted box branch is shared too, only the head's class branch is doubled.
    ``budget``: plan the LoRA/DoRA ranks per layer to fit ``"5%"`` of the task model's parameters or an adapter
    file of ``"250KB"`` (:mod:`visionpeft.budget`), counting the file as ``file_bits`` stores it (in 4 bits a rank
    costs 0.28x its float16 bytes); the methods' ranks become the planner's middle, a layer may get
    up to twice as much or none. ``rank_plan``: ``gradient`` (rank where the first batches' weight gradients need
    it) or ``uniform`` (the largest rank that fits everywhere).
    ``ema_tau``: the EMA's time constant in optimizer steps; ``auto`` scales it to the run (:mod:`.ema`), ``None``
    keeps Ultralytics' 2000, under which a short fine-tune's EMA is its last step's weights.
    ``distill_base``: weight of a distillation from the untouched base (:mod:`.distill`) that keeps the base's class
    outputs on the adapted features, for a single-path keep-base model; 0: off. ``distill_kind``: what it matches,
    ``scores`` (class probabilities and box distributions), ``logits`` (class logits, L2, and box distributions) or
    ``features`` (the head's input features, L2). ``distill_dreams``: also distill on this many synthetic images of
    what the base knew, made from its BatchNorm statistics at the start of the run (:mod:`.dreams`; 0: off), with
    ``dream_steps`` optimisation steps each, distilled with ``dream_weight`` (default: ``distill_base``);
    ``dream_augment``: each step distills on a new zoomed and flipped view of its dreams, not the fixed images.
    ``dream_objects``: each dream is also optimised until the base sees this many of its classes in it (drawn at
    random; 0: the BatchNorm statistics alone).
    ``keep_scale``: with ``keep_base: head`` or ``classes``, the deliverable ``best.safetensors`` holds the adapter
    scaled toward the base by this factor where the base classes read it (:func:`visionpeft.scale_adapter`): fewer
    base-class points lost for some new-class ones; 1: as trained. ``keep_scale_pattern``: module-name patterns with
    their own factor in [0, 1] (``scale_adapter``'s ``pattern``), e.g. ``{'model\\.[0-4]\\..*': 0}``.
    ``file_bits``: how ``best.safetensors`` stores the low-rank factors: 16 (float16), 8 or 4 (integers in blocks
    of 32 with a float16 scale each, :func:`visionpeft.save_adapter`'s ``bits``); everything else is float16.
    """

    adapter_name: str = "default"
    methods: list[dict] = field(default_factory=lambda: [LoraConfig().to_dict()])
    bn: str = "frozen"
    lr_mult: float = 1.0
    full_lr_mult: float | None = None
    loraplus_lr_ratio: float = 1.0
    keep_base: bool | str = False
    budget: str | None = None
    rank_plan: str = "gradient"
    ema_tau: float | str | None = None
    distill_base: float = 0.0
    distill_kind: str = "scores"
    distill_dreams: int = 0
    dream_steps: int = 200
    dream_weight: float | None = None
    dream_augment: bool = False
    dream_objects: int = 0
    keep_scale: float = 1.0
    keep_scale_pattern: dict = field(default_factory=dict)
    file_bits: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_name, str) or not self.adapter_name or "." in self.adapter_name:
            raise ValueError(f"peft.adapter_name must be a non-empty name without dots, not {self.adapter_name!r}.")
        if self.bn not in {"frozen", "train"}:
            raise ValueError(f"peft.bn must be 'frozen' or 'train', not {self.bn!r}.")
        for key in ("lr_mult", "full_lr_mult", "loraplus_lr_ratio"):
            value = getattr(self, key)
            if key == "full_lr_mult" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"peft.{key} must be a positive number, not {value!r}.")
        check_keep_base_mode(self.keep_base, prefix="peft.")
        if self.budget is not None:
            parse_budget(self.budget)
            check_plannable(self.methods or [])
        try:
            check_ema_tau(self.ema_tau)
        except ValueError as e:
            raise ValueError(f"peft.{e}") from None
        try:
            check_distill_base(self.distill_base)
            check_distill_kind(self.distill_kind)
            if self.dream_weight is not None:
                check_distill_base(self.dream_weight, "dream_weight")
        except ValueError as e:
            raise ValueError(f"peft.{e}") from None
        for key in ("distill_dreams", "dream_steps", "dream_objects"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"peft.{key} must be a whole number >= 0, not {value!r}.")
        if self.distill_dreams and not self.distill_base:
            raise ValueError("peft.distill_dreams needs peft.distill_base > 0 (the dreams are distilled with its "
                             "weight); set both, or drop distill_dreams.")
        if not isinstance(self.dream_augment, bool):
            raise ValueError(f"peft.dream_augment must be true or false, not {self.dream_augment!r}.")
        if not self.distill_dreams and (self.dream_weight is not None or self.dream_augment or self.dream_objects):
            raise ValueError("peft.dream_weight, dream_augment and dream_objects act on peft.distill_dreams; set "
                             "distill_dreams: N (e.g. 32), or drop them.")
        if self.distill_dreams and self.bn != "frozen":
            raise ValueError("peft.distill_dreams needs peft.bn: frozen (trained BatchNorm statistics would move "
                             "toward the synthetic images).")
        if isinstance(self.keep_scale, bool) or not isinstance(self.keep_scale, (int, float)) or not (
                0 < self.keep_scale <= 1):
            raise ValueError(f"peft.keep_scale must be a number in (0, 1], not {self.keep_scale!r}.")
        try:
            check_scale_pattern(self.keep_scale_pattern)
        except ValueError as e:
            raise ValueError(f"peft.keep_scale_pattern: {e}") from None
        if (self.keep_scale != 1 or self.keep_scale_pattern) and self.keep_base not in SHARED_MODES:
            raise ValueError("peft.keep_scale scales a trunk shared with the base classes; set peft.keep_base: "
                             "classes or head (with distill_base), or drop keep_scale and keep_scale_pattern.")
        if self.file_bits not in FILE_BITS or isinstance(self.file_bits, bool):
            raise ValueError(f"peft.file_bits must be one of {list(FILE_BITS)} (16: float16; 8 or 4: the low-rank "
                             f"factors rounded in blocks), not {self.file_bits!r}.")
        if self.rank_plan not in RANK_PLANS:
            raise ValueError(f"peft.rank_plan must be one of {list(RANK_PLANS)}, not {self.rank_plan!r}.")
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("peft.methods must be a non-empty list of method configs, e.g. "
                             "[{method: lora, r: 8, alpha: 16}].")
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict):
                raise ValueError(f"peft.methods[{i}] must be a mapping with a 'method' key, not {m!r}.")
            try:
                config_from_dict(m)  # fail early, with the list of valid options
            except (TypeError, ValueError) as e:
                raise ValueError(f"peft.methods[{i}]: {e}") from e

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftSpec:
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"Unknown peft key(s) {unknown}. Valid keys: {cls.field_names()}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def configs(self, images: int | None = None) -> list[dict]:
        """The method configs to inject; for a train split of ``images`` images, without the methods whose
        ``min_images`` it does not reach (``None``: all of them)."""
        methods = [m for m in self.methods if images is None or images >= m.get("min_images", 0)]
        if not methods:
            raise ValueError(f"Every method of peft.methods needs more train images than the {images} of this data "
                             f"(min_images {[m.get('min_images', 0) for m in self.methods]}); lower min_images, or "
                             "add a method without it (e.g. {method: dora, r: 8, alpha: 16}).")
        extra = [{"method": "trainable", "target_types": ["BatchNorm2d"]}] if self.bn == "train" else []
        layers = [m.get("layers") for m in methods]
        if extra and self.keep_base is True and all(layers):  # trainable BatchNorms only where the branch is
            extra[0]["layers"] = sorted(set().union(*(config_from_dict(m).layers for m in methods)))
        return [*methods, *extra]

    def inject(self, model: nn.Module, names, configs: list[dict] | None = None) -> nn.Module:
        """Add this spec's adapter to ``model`` for a dataset of class ``names`` (``configs``: planned ones, or
        ``configs(images)``)."""
        return inject(model, configs or self.configs(), adapter_name=self.adapter_name, names=names,
                      keep_base=self.keep_base)


@dataclass
class RunConfig:
    """A checked training config; ``model`` and ``data`` are absolute paths once files are checked."""

    data: str
    model: str = DEFAULT_MODEL
    peft: PeftSpec = field(default_factory=PeftSpec)
    augmentations: list | None = None
    train: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the YAML it came from

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML-able sections (what the run directory's ``visionpeft.yaml`` holds)."""
        return {"model": self.model, "data": self.data, "peft": asdict(self.peft),
                "augmentations": self.augmentations, "train": dict(self.train)}

    def trainer_overrides(self) -> dict[str, Any]:
        """The ``overrides`` for :class:`PeftDetectionTrainer`: the train args plus model, data, augmentations."""
        out = {**self.train, "model": self.model, "data": self.data}
        if self.augmentations is not None:
            out["augmentations"] = to_ultralytics(self.augmentations)
        return out


def find_config(cfg: str | Path) -> Path:
    """A config given as a path, or as a bare name (``crops`` or ``crops.yaml``) in the repo's ``configs/``."""
    return find_file(cfg, CONFIGS_DIR, "Config", lambda: f"Pass a path, or one of the configs in {CONFIGS_DIR}: "
                     f"{sorted(x.name for x in CONFIGS_DIR.glob('*.yaml'))}.", suffixes=(".yaml",),
                     known=(".yaml", ".yml"))


def parse_value(text: str) -> Any:
    """A command-line value: Ultralytics' rules (None/True/False, Python literals), then YAML (``[a: 1]``)."""
    from ultralytics.cfg import smart_value

    value = smart_value(text)
    if isinstance(value, str) and text.strip()[:1] in "[{":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return value
    return value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["epochs=3", "peft.lr_mult=2"]`` -> ``{"epochs": 3, "peft.lr_mult": 2}``."""
    out = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"Override '{arg}' is not key=value (e.g. epochs=3, peft.lr_mult=2, data=coco8.yaml).")
        out[key.strip()] = parse_value(value.strip())
    return out


def _set_path(raw: dict, key: str, value: Any) -> None:
    section, *path = key.split(".")
    if section not in SECTIONS:
        raise _unknown("config section", section, SECTIONS)
    node: Any = raw
    parts = [section, *path]
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, dict):
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        elif isinstance(node, list) and part.isdigit():
            if int(part) >= len(node):
                raise ConfigError(f"Override '{key}': index {part} is out of range ({'.'.join(parts[:i])} has "
                                  f"{len(node)} item(s)).")
            node = node[int(part)]
        else:
            raise ConfigError(f"Override '{key}': '{part}' does not exist in {'.'.join(parts[:i]) or 'the config'}.")
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"Override '{key}': index '{last}' is out of range (the list has {len(node)} items).")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"Override '{key}': {'.'.join(parts[:-1])} is not a section.")


def apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Apply overrides to a raw config dict (in place): sections, dotted paths, plain Ultralytics train keys."""
    for key, value in overrides.items():
        if "." in key:
            _set_path(raw, key, value)
        elif key in SECTIONS:
            if key in {"peft", "train"} and isinstance(value, Mapping) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        else:
            if raw.get("train") is None:
                raw["train"] = {}
            raw["train"][key] = value
    return raw


def check_train_args(train: Mapping[str, Any]) -> dict[str, Any]:
    """Ultralytics train args: known keys (else the list of valid ones) and values of the right type."""
    from ultralytics.cfg import check_cfg

    valid = ultralytics_train_keys()
    for key in train:
        if key in RESERVED_TRAIN_KEYS:
            raise ConfigError(f"'train.{key}' is not for the train section: {RESERVED_TRAIN_KEYS[key]}.")
        if key not in valid:
            raise _unknown("Ultralytics train key", key, valid)
    out = dict(train)
    try:
        check_cfg(out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train: {e}") from e
    return out


def runs_project(project: str | None = None, task: str = "detect") -> str | None:
    """The ``project`` folder of a run: README's rule, ``./runs/<task>`` under the current directory.

    Ultralytics puts runs under its ``runs_dir`` setting, which its first call on a machine fixes under that call's
    directory (a test run in a deleted clone would keep receiving every later run). Only a ``runs_dir`` the user
    set on purpose, i.e. a folder not named ``runs`` (``yolo settings runs_dir=/data/experiments``), is followed:
    then this returns ``project`` unchanged and Ultralytics resolves it. A relative ``project`` goes under
    ``./runs/<task>`` as Ultralytics would put it under ``runs_dir/<task>``.
    """
    from ultralytics.utils import SETTINGS

    if Path(SETTINGS["runs_dir"]).name != "runs" or (project and Path(project).expanduser().is_absolute()):
        return project
    base = Path.cwd() / "runs" / task
    return str(base / project if project else base)


def build_config(raw: Mapping[str, Any], source: Path | None = None, check_files: bool = True) -> RunConfig:
    """Check a raw config dict, section by section, and resolve its files (``check_files``)."""
    where = f" in {source}" if source else ""
    for key in raw:
        if key not in SECTIONS:
            raise _unknown(f"config section{where}", key, SECTIONS)
    data = raw.get("data")
    if not data:
        raise ConfigError(f"No dataset{where}: set 'data:' to a data YAML (e.g. data=crop_weed.yaml).")
    model = raw.get("model") or DEFAULT_MODEL
    peft = raw.get("peft") or {}
    if not isinstance(peft, Mapping):
        raise ConfigError(f"'peft:' must be a mapping with keys {PeftSpec.field_names()}, not {peft!r}.")
    try:
        spec = PeftSpec.from_dict(dict(peft))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    augmentations = raw.get("augmentations")
    try:
        build_transforms(augmentations)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    train = raw.get("train") or {}
    if not isinstance(train, Mapping):
        raise ConfigError(f"'train:' must be a mapping of Ultralytics train arguments, not {train!r}.")
    train = check_train_args(train)
    project = runs_project(train.get("project"))
    if project is not None:
        train["project"] = project
    if check_files:
        if str(model).endswith(".pt"):
            model = str(resolve_weights(model))
        data = str(load_dataset(data)[1])
    return RunConfig(data=str(data), model=str(model), peft=spec, augmentations=augmentations, train=train,
                     source=source)


def load_config(cfg: str | Path | Mapping | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
                check_files: bool = True) -> RunConfig:
    """The checked config of ``cfg`` (a YAML path or name in ``configs/``, a dict, or ``None``) with ``overrides``
    (a dict, or ``key=value`` strings)."""
    source = None
    if cfg is None:
        raw: dict = {}
    elif isinstance(cfg, Mapping):
        raw = copy.deepcopy(dict(cfg))
    else:
        source = find_config(cfg)
        try:
            raw = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must be a mapping with sections {list(SECTIONS)}.")
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    apply_overrides(raw, overrides or {})
    return build_config(raw, source, check_files)

