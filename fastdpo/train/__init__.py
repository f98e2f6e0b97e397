"""Training on top of the losses: ``DPOTrainer`` / ``DPOConfig`` and the ``fastdpo`` command.

``import fastdpo`` does not import this package; ``fastdpo.DPOTrainer`` and ``fastdpo.DPOConfig``
load it on first use.
"""

from fastdpo.train.config import DPOConfig
from fastdpo.train.trainer import DPOTrainer

__all__ = ["DPOConfig", "DPOTrainer"]
