"""fastdpo: fused, kernel-backed Direct Preference Optimization losses.

``token_logps`` / ``sequence_logps`` turn ``[N, T, V]`` logits into labelled-token
log-probabilities in one fused pass; ``preference_loss`` and ``DPOLoss`` build TRL's loss
family on top. ``linear_token_logps`` / ``linear_sequence_logps`` / ``FusedLinearDPOLoss`` do
the same from hidden states and the LM head without ever holding the logits. ``DPOTrainer`` /
``DPOConfig`` (in :mod:`fastdpo.train`) train a ``transformers`` causal LM with them; they are
imported on first use, so ``import fastdpo`` does not load the trainer or what it needs.
"""

from fastdpo.backends import available_backends
from fastdpo.functional import LOSS_TYPES, preference_loss
from fastdpo.linear import fused_linear_logps, linear_sequence_logps, linear_token_logps
from fastdpo.logps import fused_logps, sequence_logps, token_logps
from fastdpo.modules import DPOLoss, DPOOutput, FusedLinearDPOLoss

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOLoss",
    "DPOOutput",
    "DPOTrainer",
    "FusedLinearDPOLoss",
    "LOSS_TYPES",
    "available_backends",
    "fused_linear_logps",
    "fused_logps",
    "linear_sequence_logps",
    "linear_token_logps",
    "preference_loss",
    "sequence_logps",
    "token_logps",
]


def __getattr__(name: str):
    # PEP 562: the training side (tqdm, numpy, torch.distributed, transformers on use) loads only when asked for.
    if name in ("DPOConfig", "DPOTrainer"):
        from fastdpo import train

        return getattr(train, name)
    raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")
