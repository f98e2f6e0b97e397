"""fastdpo: fused, kernel-backed Direct Preference Optimization losses.

``token_logps`` / ``sequence_logps`` turn ``[N, T, V]`` logits into labelled-token
log-probabilities in one fused pass; ``preference_loss`` and ``DPOLoss`` build TRL's loss
family on top; ``DPOTrainer`` / ``DPOConfig`` train a ``transformers`` causal LM with them.
"""

from fastdpo.logps import available_backends, fused_logps, sequence_logps, token_logps
from fastdpo.loss import DPOLoss, DPOOutput
from fastdpo.losses import LOSS_TYPES, preference_loss
from fastdpo.trainer import DPOConfig, DPOTrainer

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOLoss",
    "DPOOutput",
    "DPOTrainer",
    "LOSS_TYPES",
    "available_backends",
    "fused_logps",
    "preference_loss",
    "sequence_logps",
    "token_logps",
]
