"""Training through the Ultralytics pipeline: configs, augmentations, the PEFT trainer, run summaries.

``visionpeft.train.train("crops.yaml", epochs=3)`` runs one config; ``python scripts/train.py --cfg crops.yaml
epochs=3`` does the same from the command line.
"""

from .config import ConfigError, RunConfig, load_config
from .data import resolve_dataset
from .offline import ensure_fonts
from .run import train
from .summary import RunSummary
from .trainer import PeftDetectionTrainer, PeftSpec

__all__ = ["ConfigError", "PeftDetectionTrainer", "PeftSpec", "RunConfig", "RunSummary", "ensure_fonts",
           "load_config", "resolve_dataset", "train"]
