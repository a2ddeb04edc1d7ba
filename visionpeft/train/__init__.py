"""Training through the Ultralytics pipeline."""

from .trainer import PeftDetectionTrainer, PeftSpec

__all__ = ["PeftDetectionTrainer", "PeftSpec"]
