"""The model side of a DPO step: one forward of ``[chosen; rejected]``, then the loss.

When the causal LM's head is a plain ``nn.Linear`` on the backbone's last hidden state (and the
model does not rescale or soft-cap its logits), the loss runs on ``(hidden, weight)`` with
:class:`fastdpo.FusedLinearDPOLoss`, so the ``[2B, T, V]`` logits never exist. Otherwise the
model's logits go to :class:`fastdpo.DPOLoss`. :func:`fused_linear_reason` says which, and why.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdpo.backends.common import scored_labels
from fastdpo.functional import length_desensitized_logps
from fastdpo.linear import fused_linear_logps, linear_sequence_logps
from fastdpo.logps import fused_logps, sequence_logps
from fastdpo.modules import DPOLoss, DPOOutput, FusedLinearDPOLoss
from fastdpo.train.data import IGNORE_INDEX

# Config attributes with which a model's logits are not ``hidden @ W.T + b`` (as in TRL's fused head).
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def fused_linear_reason(model: nn.Module) -> str | None:
    """``None`` when the fused linear path reproduces ``model``'s logits, else why it cannot."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"the output embeddings are {type(head).__name__}, not a plain nn.Linear"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"the model's config sets {name}={value}, which the fused path does not apply"
    if getattr(model, "base_model", model) is model:
        return "the model has no separate backbone (base_model) to take hidden states from"
    return _check_hidden_times_head(model, head)


@torch.no_grad()
def _check_hidden_times_head(model: nn.Module, head: nn.Linear) -> str | None:
    """One forward of 8 tokens: do the model's logits equal its head applied to the backbone output?"""
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(8, device=head.weight.device).remainder(head.weight.shape[0]).unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        projected = head(hidden).float()
    finally:
        model.train(was_training)
    tolerance = 1e-3 * (1 + logits.abs().max().item())
    if projected.shape != logits.shape or (projected - logits).abs().max().item() > tolerance:
        return "the model's logits are not its head applied to its backbone's last hidden state"
    return None


def loss_path(model: nn.Module, fused_linear: bool | None) -> tuple[bool, str | None]:
    """``(fused, why_not)``: does the loss run on hidden states and the head? ``fused_linear`` True
    demands it (an error when the model does not allow it), False refuses it, None takes it
    wherever it reproduces the model's logits."""
    reason = fused_linear_reason(model)
    if fused_linear and reason:
        raise ValueError(f"fused_linear=True but the fused linear path cannot run this model: {reason}")
    fused = reason is None and fused_linear is not False
    return fused, reason or (None if fused else "fused_linear=False")


def make_loss(fused: bool, **options) -> nn.Module:
    """``FusedLinearDPOLoss`` or ``DPOLoss`` with the same options."""
    return FusedLinearDPOLoss(**options) if fused else DPOLoss(**options)


def hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """``(hidden [N, T, H], weight [V, H], bias [V] or None)``: the backbone output and the LM head.

    All three in one dtype: the autocast dtype when autocast is on (as ``nn.Linear`` would run
    under it), else the head's. The fused linear path turns autocast off inside its own tiles.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    head = model.get_output_embeddings()
    device = head.weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    return hidden.last_hidden_state.to(dtype), head.weight.to(dtype), bias


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N, T, V]`` logits of a causal LM."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class PolicyLoss(nn.Module):
    """The policy forward and the DPO loss in one module (the unit DistributedDataParallel wraps).

    ``forward(input_ids [2B, T], attention_mask [2B, T], labels [2B, T], ref_logps [2B] or None)``
    returns a :class:`DPOOutput`; rows ``0..B-1`` are chosen, ``B..2B-1`` rejected.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, fused: bool, fused_reason: str | None = None
    ) -> None:
        super().__init__()
        self.model, self.loss_fn, self.fused = model, loss_fn, fused
        self.fused_reason = fused_reason  # why the loss runs on logits (None when fused)

    @classmethod
    def build(cls, model: nn.Module, config) -> PolicyLoss:
        """The loss of ``config`` (a :class:`fastdpo.DPOConfig`) on the path :func:`loss_path` picks."""
        fused, reason = loss_path(model, config.fused_linear)
        return cls(model, make_loss(fused, **config.loss_options()), fused, reason)

    def forward(self, input_ids, attention_mask, labels, ref_logps=None) -> DPOOutput:
        if self.fused:
            hidden, weight, bias = hidden_and_head(self.model, input_ids, attention_mask)
            return self.loss_fn(hidden, weight, labels, bias=bias, ref_logps=ref_logps)
        return self.loss_fn(logits_of(self.model, input_ids, attention_mask), labels, ref_logps=ref_logps)


@torch.no_grad()
def model_sequence_logps(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    fused: bool,
    average: bool = False,
    backend: str = "auto",
    ld_alpha: float | None = None,
) -> torch.Tensor:
    """``[2B]`` float32 summed (or averaged) completion log-probs of ``model`` on a collated batch;
    with ``ld_alpha``, LD-DPO's weighted sums (as the loss weights the policy's)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ld_alpha is not None:
        if fused:
            hidden, weight, bias = hidden_and_head(model, ids, mask)
            out = fused_linear_logps(hidden, weight, labels, bias=bias, backend=backend)
        else:
            out = fused_logps(logits_of(model, ids, mask), labels, backend=backend)
        logps = length_desensitized_logps(
            out.token_logps, scored_labels(labels, True) != IGNORE_INDEX, ld_alpha
        )
        return logps / out.counts.clamp(min=1) if average else logps
    if fused:
        hidden, weight, bias = hidden_and_head(model, ids, mask)
        return linear_sequence_logps(hidden, weight, labels, bias=bias, average=average, backend=backend)
    return sequence_logps(logits_of(model, ids, mask), labels, average=average, backend=backend)
