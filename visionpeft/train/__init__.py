"""Training through the Ultralytics pipeline: configs, augmentations, the PEFT trainer, run summaries.

``visionpeft.train.train("crops.yaml", epochs=3)`` runs one config; ``python scripts/train.py --cfg crops.yaml
epochs=3`` does the same from the command line.
"""

from ..datasets import resolve_dataset
from ..fonts import ensure_fonts
from .config import ConfigError, PeftSpec, RunConfig, load_config
from .summary import RunSummary


def __getattr__(name: str):
    # The trainer imports Ultralytics' training stack: loaded on first use, so reading a config does not import it
    if name == "train":
        from .run import train as value
    elif name == "PeftDetectionTrainer":
        from .trainer import PeftDetectionTrainer as value
    else:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    globals()[name] = value
    return value


__all__ = ["ConfigError", "PeftDetectionTrainer", "PeftSpec", "RunConfig", "RunSummary", "ensure_fonts",
           "load_config", "resolve_dataset", "train"]
