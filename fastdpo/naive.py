"""The readable oracle: the original DPO code path, used by the parity tests.

Not a backend: it upcasts the whole logits tensor to float32 and materialises a full
``log_softmax`` copy, which is exactly the memory and time fastdpo exists to avoid.
"""

from __future__ import annotations

import torch


def naive_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True
) -> torch.Tensor:
    """Per-token log-probs ``[N, T']`` (float32): upcast, log_softmax, gather, mask."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logps, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    # where, not `* mask`: an ignored row may be all -inf, whose log_softmax is NaN and NaN * 0 = NaN
    return torch.where(mask, picked, 0.0)


def naive_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
) -> torch.Tensor:
    """Per-sequence sums ``[N]`` of :func:`naive_token_logps` (or means when ``average``)."""
    per_token = naive_token_logps(logits, labels, ignore_index=ignore_index, shift=shift)
    total = per_token.sum(-1)
    if not average:
        return total
    target = labels[:, 1:] if shift else labels
    counts = (target != ignore_index).sum(-1)
    return total / counts.clamp(min=1)


def naive_mean_logit_sums(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True
) -> torch.Tensor:
    """Per-sequence sum over counted tokens of the logits' vocabulary sum ``[N]`` (float32)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    # where, not `* mask`: an ignored row of a masked vocabulary sums to -inf, and -inf * 0 = NaN
    return torch.where(mask, logits.float().sum(-1), 0.0).sum(-1)
