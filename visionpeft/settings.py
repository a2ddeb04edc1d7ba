"""Where visionpeft finds the shared assets, and the offline switches set before Ultralytics is imported."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source checkout (configs/, datasets/ live here)
ASSETS_ENV = "VISIONPEFT_ASSETS"

# Never reach the network at run time: Ultralytics would fetch weights, fonts and datasets and check for updates.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def assets_dir() -> Path:
    """The assets location: ``$VISIONPEFT_ASSETS``, else ``../shared/assets`` beside the checkout."""
    env = os.environ.get(ASSETS_ENV)
    return Path(env).expanduser().resolve() if env else (ROOT.parent / "shared" / "assets").resolve()


def weights_dir() -> Path:
    return assets_dir() / "weights"


def datasets_dir() -> Path:
    return assets_dir() / "datasets"
