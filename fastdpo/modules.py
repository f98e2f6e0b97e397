"""``DPOLoss`` (on logits) and ``FusedLinearDPOLoss`` (on hidden states and the LM head): the DPO
loss family with TRL's batch layout and metric names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdpo.linear import fused_linear_logps
from fastdpo.linear_dpo import DEFAULT_MEMORY_BUDGET_MIB, loss_in_forward
from fastdpo.logps import FusedLogps, fused_logps
from fastdpo.functional import check_loss_options, preference_loss


@dataclass
class DPOOutput:
    """Result of a DPO loss call. Every per-pair tensor is ``[B]`` float32."""

    loss: torch.Tensor  # scalar, mean over pairs (plus any sft term)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    # Mean logit over the vocabulary and the counted tokens of all chosen / rejected rows.
    mean_chosen_logit: float = float("nan")
    mean_rejected_logit: float = float("nan")

    def metrics(self) -> dict[str, float]:
        """Floats under TRL's DPOTrainer names (batch means)."""
        margins = self.chosen_rewards - self.rejected_rewards
        return {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().mean().item(),
            "rewards/margins": margins.mean().item(),
            "logps/chosen": self.policy_chosen_logps.detach().mean().item(),
            "logps/rejected": self.policy_rejected_logps.detach().mean().item(),
            "logits/chosen": self.mean_chosen_logit,
            "logits/rejected": self.mean_rejected_logit,
        }


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0..B-1 are chosen, B..2B-1 rejected; an odd batch is an error."""
    if x.shape[0] % 2:
        raise ValueError(
            f"the batch must hold chosen rows then rejected rows (even size), got {x.shape[0]} rows"
        )
    return x.chunk(2, dim=0)


def mean_logits(logit_sums: torch.Tensor, counts: torch.Tensor, vocab: int) -> tuple[float, float]:
    """TRL's ``logits/chosen`` and ``logits/rejected``: mean logit over vocab and counted tokens."""
    sums = [s.sum().item() for s in split_pairs(logit_sums.detach())]
    tokens = [c.sum().item() for c in split_pairs(counts)]
    return tuple(s / (n * vocab) if n else 0.0 for s, n in zip(sums, tokens))


class _DPOLossBase(nn.Module):
    """Options, reference handling and the loss shared by :class:`DPOLoss` and :class:`FusedLinearDPOLoss`."""

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
        *,
        loss_weights: Sequence[float] | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        simpo_gamma: float = 0.5,
        shift: bool = True,
    ) -> None:
        super().__init__()
        check_loss_options(loss_type, loss_weights, beta, label_smoothing, f_divergence_type)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference_free, self.average_log_prob = reference_free, average_log_prob
        self.ignore_index, self.backend, self.shift = ignore_index, backend, shift
        self.loss_options = dict(
            loss_weights=loss_weights,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
        )

    def _sequence(self, out: FusedLogps) -> torch.Tensor:
        return out.sequence_logps / out.counts.clamp(min=1) if self.average_log_prob else out.sequence_logps

    def _check_one_reference(self, ref_inputs: str, given_inputs, ref_logps) -> None:
        given = (given_inputs is not None) + (ref_logps is not None) + bool(self.reference_free)
        if given != 1:
            raise ValueError(
                f"give exactly one reference: {ref_inputs}, ref_logps, or reference_free=True "
                f"(got {ref_inputs}={'set' if given_inputs is not None else None}, "
                f"ref_logps={'set' if ref_logps is not None else None}, reference_free={self.reference_free})"
            )

    def _reference(self, policy: FusedLogps, compute, ref_logps) -> torch.Tensor:
        """``[2B]`` reference log-probs: ``compute()`` (a fused pass, run without autograd),
        precomputed ``ref_logps``, or zeros when reference-free."""
        if compute is not None:
            with torch.no_grad():
                return self._sequence(compute())
        if ref_logps is not None:
            n = policy.sequence_logps.shape[0]
            if ref_logps.shape != (n,):
                raise ValueError(f"ref_logps must be [2B] = [{n}], got {tuple(ref_logps.shape)}")
            return ref_logps.detach().float()
        return torch.zeros_like(policy.sequence_logps)

    def loss_from_logps(self, policy, reference: torch.Tensor, vocab: int) -> DPOOutput:
        """Finish the loss from the fused pass of the policy and ``[2B]`` reference log-probs."""
        sequence = self._sequence(policy)
        pi_c, pi_r = split_pairs(sequence)
        ref_c, ref_r = split_pairs(reference)
        if self.average_log_prob:
            n_c = n_r = None  # already per-token means
        else:
            n_c, n_r = split_pairs(policy.counts)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pi_c, pi_r, ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, chosen_counts=n_c, rejected_counts=n_r, **self.loss_options,
        )  # fmt: skip
        mean_c, mean_r = mean_logits(policy.logit_sums, policy.counts, vocab)
        return DPOOutput(
            loss=losses.mean(),
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            policy_chosen_logps=pi_c,
            policy_rejected_logps=pi_r,
            ref_chosen_logps=ref_c,
            ref_rejected_logps=ref_r,
            mean_chosen_logit=mean_c,
            mean_rejected_logit=mean_r,
        )


class DPOLoss(_DPOLossBase):
    """DPO (and the TRL loss family) on ``[2B, T, V]`` policy logits.

    ``forward(policy_logits, labels, ref_logits=None, *, ref_logps=None) -> DPOOutput``.
    Rows ``0..B-1`` of the batch are chosen, ``B..2B-1`` rejected (row ``i`` pairs with ``i+B``).
    The reference is exactly one of ``ref_logits`` (same shape, no gradient), ``ref_logps``
    (``[2B]`` precomputed) or ``reference_free=True``. With ``average_log_prob`` the sequence
    log-probs are per-token means, and losses that normalise by length use them as they are.
    ``inplace_backward`` lets the backward write the gradient into the policy logits' storage
    (for callers that no longer need the logits; backends without it allocate as usual).
    """

    def __init__(self, *args, inplace_backward: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inplace_backward = inplace_backward

    def _logps(self, logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False) -> FusedLogps:
        return fused_logps(
            logits, labels, ignore_index=self.ignore_index, shift=self.shift, backend=self.backend,
            inplace_backward=inplace,
        )  # fmt: skip

    def forward(
        self,
        policy_logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
        *,
        ref_logps: torch.Tensor | None = None,
    ) -> DPOOutput:
        self._check_one_reference("ref_logits", ref_logits, ref_logps)
        split_pairs(policy_logits)
        if ref_logits is not None and ref_logits.shape[:2] != labels.shape:
            raise ValueError(
                f"ref_logits shape {tuple(ref_logits.shape)} does not match labels {tuple(labels.shape)}"
            )
        policy = self._logps(policy_logits, labels, self.inplace_backward)
        compute = None if ref_logits is None else (lambda: self._logps(ref_logits, labels))
        return self.loss_from_logps(
            policy, self._reference(policy, compute, ref_logps), policy_logits.shape[-1]
        )


class FusedLinearDPOLoss(_DPOLossBase):
    """:class:`DPOLoss` computed from the last hidden states and the LM head, without logits.

    ``forward(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_logps=None) -> DPOOutput`` gives the same results as
    ``DPOLoss()(hidden @ weight.T + bias, labels, ...)``, but the ``[2B, T, V]`` logits never exist
    (see fastdpo/linear_tiles.py). ``hidden`` is ``[2B, T, H]`` (chosen rows, then rejected
    rows), ``weight`` ``[V, H]``, ``bias`` ``[V]``. The reference is exactly one of
    ``ref_hidden`` (with ``ref_weight`` / ``ref_bias``, which default to the policy's head, for
    a shared frozen head), ``ref_logps`` (``[2B]``) or ``reference_free=True``. Gradients flow to
    ``hidden``, ``weight`` and ``bias``. Options are those of :class:`DPOLoss`, plus
    ``memory_budget_mib``: the float32 softmax tiles the native backend may keep to skip the
    backward's recompute of the logits (fastdpo/linear_dpo.py: per-pair losses only; ``aot*``
    and ``sft`` always recompute; 0 always recomputes).
    """

    def __init__(self, *args, memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not memory_budget_mib >= 0:
            raise ValueError(f"memory_budget_mib must be >= 0, got {memory_budget_mib}")
        self.memory_budget_mib = memory_budget_mib

    def _logps(self, hidden, weight, labels, bias) -> FusedLogps:
        return fused_linear_logps(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.backend,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> DPOOutput:
        self._check_one_reference("ref_hidden", ref_hidden, ref_logps)
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias need ref_hidden (the reference model's hidden states)")
        split_pairs(hidden)
        if ref_hidden is not None and ref_hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"ref_hidden shape {tuple(ref_hidden.shape)} does not match labels {tuple(labels.shape)}"
            )
        compute = None
        if ref_hidden is not None:
            head = weight if ref_weight is None else ref_weight
            head_bias = bias if ref_weight is None and ref_bias is None else ref_bias
            compute = lambda: self._logps(ref_hidden, head, labels, head_bias)  # noqa: E731
        # Issue 15: no recompute of the logits when the memory budget allows (fastdpo/linear_dpo.py).
        eager = loss_in_forward(self, hidden, weight, bias, labels, compute, ref_logps)
        if eager is not None:
            return eager
        policy = self._logps(hidden, weight, labels, bias)
        return self.loss_from_logps(policy, self._reference(policy, compute, ref_logps), weight.shape[0])
