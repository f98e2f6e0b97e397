"""fastdpo: fused, kernel-backed Direct Preference Optimization losses.

``token_logps`` / ``sequence_logps`` turn ``[N, T, V]`` logits into labelled-token
log-probabilities in one fused pass; ``preference_loss`` and ``DPOLoss`` build TRL's loss
family on top.
"""

from fastdpo.logps import available_backends, fused_logps, sequence_logps, token_logps
from fastdpo.loss import DPOLoss, DPOOutput
from fastdpo.losses import LOSS_TYPES, preference_loss

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "DPOOutput",
    "LOSS_TYPES",
    "available_backends",
    "fused_logps",
    "preference_loss",
    "sequence_logps",
    "token_logps",
]
