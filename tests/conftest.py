"""Shared fixtures: real base models loaded once per session (deep-copied per test) and output comparisons.

Models are tiny real networks: Ultralytics YAML builds and the COCO-pretrained checkpoints from the assets
(``$VISIONPEFT_ASSETS`` or ``../shared/assets``), and a timm ViT with random weights at 64 px. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path


def _user_settings_file() -> Path:
    """Where Ultralytics keeps the user's settings (as ultralytics.utils.get_user_config_dir finds it on Linux)."""
    env = os.environ.get("YOLO_CONFIG_DIR")
    config = Path(env).expanduser() if env else Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return config / "Ultralytics" / "settings.json"


def _snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


# Before Ultralytics is imported anywhere: its first import writes settings.json (runs_dir, datasets_dir, ...
# fixed under the current directory), so the suite gets a settings folder of its own and the user's stays as it was.
USER_SETTINGS = _user_settings_file()
USER_SETTINGS_BEFORE = _snapshot(USER_SETTINGS)
TEST_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="visionpeft-tests-ultralytics-"))
os.environ["YOLO_CONFIG_DIR"] = str(TEST_CONFIG_DIR)  # subprocesses of the tests inherit it
# Cached plain-base exports (visionpeft.export.onnx.cache_dir) go to the session's folder, not the user's cache.
os.environ["VISIONPEFT_CACHE"] = str(TEST_CONFIG_DIR / "visionpeft-cache")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import visionpeft as vp  # noqa: E402
from visionpeft.inject import adapted_modules  # noqa: E402

IMGSZ = 64
VIT = "timm:vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": IMGSZ, "num_classes": 5}


@pytest.fixture(scope="session", autouse=True)
def user_settings_untouched():
    """After the whole session, the user's Ultralytics settings file is byte for byte what it was."""
    yield
    assert _snapshot(USER_SETTINGS) == USER_SETTINGS_BEFORE, f"the test suite changed {USER_SETTINGS}"


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state, whichever tests ran before it (adapter factors, class outputs
    and images draw from the global generators)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _bases() -> dict:
    return {}


@pytest.fixture
def base(_bases: dict) -> Callable[..., nn.Module]:
    """``base("yolo11n.pt")`` / ``base("yolo11n.yaml", nc=3)`` / ``base(VIT, **VIT_KWARGS)``: a fresh copy."""

    def get(source: str, **kwargs) -> nn.Module:
        key = (source, tuple(sorted(kwargs.items())))
        if key not in _bases:
            torch.manual_seed(0)
            _bases[key] = vp.load_base(source, **kwargs)
        return copy.deepcopy(_bases[key])

    return get


@pytest.fixture(scope="module")
def data() -> Path:
    """crop_weed's data YAML in the assets (real field photos)."""
    path = vp.settings.datasets_dir() / "crop_weed" / "data.yaml"
    if not path.is_file():
        pytest.skip(f"crop_weed dataset not found at {path}")
    return path


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))


def leaves(out) -> list[torch.Tensor]:
    """Every tensor in a model output (Ultralytics returns nested tuples, lists and dicts)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in leaves(v)]
    return []


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return leaves(model.eval()(x))


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference between matching output tensors, relative to each tensor's scale (max abs value)."""
    assert len(a) == len(b) and a, "outputs differ in structure"
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape, f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}"
        scale = x.abs().max().clamp_min(1e-12)
        worst = max(worst, float((x - y).abs().max() / scale))
    return worst


def randomize_adapters(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter of the model non-zero tensors (LoRA ``B``, LoHa ``w2_B``, bottleneck ``up`` and new class
    outputs start at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, wrapper in adapted_modules(model):
            for adapter in wrapper.adapters.values():
                for name, p in adapter.named_parameters():
                    zero_start = ("lora_B.weight", "w2_B.weight", "up.weight", "up.bias")
                    if name.endswith(zero_start) or name == "bias":  # shift's bias too
                        p.copy_(torch.randn(p.shape, generator=g) * std)
                    elif name == "module.weight" and not p.any():  # a new class output: PyTorch's conv init
                        nn.init.kaiming_uniform_(p, a=math.sqrt(5), generator=g)
                    elif name == "magnitude":  # DoRA: move the magnitudes off the base norms too
                        p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def visionpeft_modules(model: nn.Module) -> list[str]:
    """Names of modules whose class comes from visionpeft (a merged model must have none)."""
    return [n for n, m in model.named_modules() if type(m).__module__.startswith("visionpeft")]


class Messages(logging.Handler):
    """Ultralytics' log records of ``level`` and above (its logger does not propagate to pytest's caplog)."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def __enter__(self) -> Messages:
        logging.getLogger("ultralytics").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("ultralytics").removeHandler(self)
