"""``DPOLoss`` (on logits) and ``FusedLinearDPOLoss`` (on hidden states and the LM head): the DPO
loss family with TRL's batch layout and metric names."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdpo.functional import check_loss_options, preference_loss
from fastdpo.linear import fused_linear_logps
from fastdpo.linear_dpo import DEFAULT_MEMORY_BUDGET_MIB, loss_in_forward
from fastdpo.logps import FusedLogps, fused_logps


@dataclass
class DPOOutput:
    """Result of a DPO loss call. Every per-pair tensor is ``[B]`` float32.

    Nothing here has left the device: :meth:`metric_tensors` gives TRL's metrics as detached
    tensors, and only :meth:`metrics` (one transfer, so one device sync) turns them into floats.
    """

    loss: torch.Tensor  # scalar, mean over pairs (plus any sft term)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    # Mean logit over the vocabulary and the counted tokens of all chosen / rejected rows: 0-dim
    # float64 tensors, 0 when no token is counted (see mean_logits). Built from float32 per-sequence
    # sums: inf once one sequence's sum of |logit| over counted rows and vocabulary passes the
    # float32 maximum (mean |logit| ~2e31 at V = 32000, 512 tokens; docs/design.md, "Bad input").
    mean_chosen_logit: torch.Tensor | None = None
    mean_rejected_logit: torch.Tensor | None = None

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """TRL's DPOTrainer metrics (batch means) as detached 0-dim tensors, without a device sync."""
        chosen, rejected = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        missing = torch.full((), float("nan"), device=chosen.device)
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": self.policy_chosen_logps.detach().mean(),
            "logps/rejected": self.policy_rejected_logps.detach().mean(),
            "logits/chosen": missing if self.mean_chosen_logit is None else self.mean_chosen_logit,
            "logits/rejected": missing if self.mean_rejected_logit is None else self.mean_rejected_logit,
        }

    def metrics(self) -> dict[str, float]:
        """:meth:`metric_tensors` as floats, in one transfer to the host (call it when logging)."""
        tensors = self.metric_tensors()
        values = torch.stack([t.double() for t in tensors.values()]).tolist()
        return dict(zip(tensors, values))


def split_pairs(x: torch.Tensor, name: str = "the batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0..B-1 are chosen, B..2B-1 rejected; an empty or odd batch is an error naming ``name``."""
    rows = x.shape[0]
    if rows == 0:
        raise ValueError(
            f"{name} is an empty batch (0 rows); it must hold B >= 1 chosen rows, then B rejected rows"
        )
    if rows % 2:
        raise ValueError(f"{name} must hold chosen rows then rejected rows (even size), got {rows} rows")
    return x.chunk(2, dim=0)


def mean_logits(
    logit_sums: torch.Tensor, counts: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``logits/chosen`` and ``logits/rejected``: mean logit over vocab and counted tokens.

    0-dim float64 tensors, no device sync. The float32 per-row sums are added in float64: their
    float32 total overflows for logits near the float32 maximum though the mean is representable.
    """
    means = []
    for sums, tokens in zip(split_pairs(logit_sums.detach()), split_pairs(counts)):
        entries = tokens.sum().double() * vocab
        means.append(torch.where(entries > 0, sums.double().sum() / entries.clamp(min=1), 0.0))
    return means[0], means[1]


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
        more = dict(
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
        )
        check_loss_options(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, **more)
        for name, flag in (
            ("reference_free", reference_free),
            ("average_log_prob", average_log_prob),
            ("shift", shift),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(
                f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}"
            )
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__} {backend!r}")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.reference_free, self.average_log_prob = reference_free, average_log_prob
        self.ignore_index, self.backend, self.shift = int(ignore_index), backend, shift
        self.loss_options = dict(loss_weights=loss_weights, f_divergence_type=f_divergence_type, **more)

    def _sequence(self, out: FusedLogps) -> torch.Tensor:
        return out.sequence_logps / out.counts.clamp(min=1) if self.average_log_prob else out.sequence_logps

    def _check_reference(self, ref_name: str, ref_inputs, ref_logps, policy_name: str, policy) -> None:
        """Exactly one reference, and the one given fits the policy's ``[2B, T, ...]`` input ``policy``."""
        if not isinstance(policy, torch.Tensor):
            raise TypeError(f"{policy_name} must be a torch.Tensor, got {type(policy).__name__}")
        split_pairs(policy, policy_name)
        given = (ref_inputs is not None) + (ref_logps is not None) + self.reference_free
        if given != 1:
            raise ValueError(
                f"give exactly one reference: {ref_name}, ref_logps, or reference_free=True "
                f"(got {ref_name}={'set' if ref_inputs is not None else None}, "
                f"ref_logps={'set' if ref_logps is not None else None}, reference_free={self.reference_free})"
            )
        if ref_inputs is not None:
            if not isinstance(ref_inputs, torch.Tensor):
                raise TypeError(f"{ref_name} must be a torch.Tensor, got {type(ref_inputs).__name__}")
            if ref_inputs.device != policy.device:
                raise ValueError(
                    f"{ref_name} is on {ref_inputs.device} but {policy_name} is on {policy.device}"
                )
            if ref_inputs.shape[:2] != policy.shape[:2]:
                raise ValueError(
                    f"{ref_name} shape {tuple(ref_inputs.shape)} does not match {policy_name} [2B, T] = "
                    f"{tuple(policy.shape[:2])}"
                )
        if ref_logps is not None:
            if not isinstance(ref_logps, torch.Tensor):
                raise TypeError(
                    f"ref_logps must be a torch.Tensor of [2B] log-probs, got {type(ref_logps).__name__}"
                )
            if not ref_logps.dtype.is_floating_point:
                raise TypeError(f"ref_logps must hold floating-point log-probs, got {ref_logps.dtype}")
            if tuple(ref_logps.shape) != (policy.shape[0],):
                raise ValueError(
                    f"ref_logps must be [2B] = [{policy.shape[0]}], got {tuple(ref_logps.shape)}"
                )
            if ref_logps.device != policy.device:
                raise ValueError(
                    f"ref_logps is on {ref_logps.device} but {policy_name} is on {policy.device}"
                )

    def _reference(self, policy: FusedLogps, ref_name: str, compute, ref_logps) -> torch.Tensor:
        """``[2B]`` reference log-probs: ``compute()`` (a fused pass, run without autograd),
        precomputed ``ref_logps``, or zeros when reference-free."""
        if compute is not None:
            try:
                with torch.no_grad():
                    return self._sequence(compute())
            except (TypeError, ValueError) as error:  # the kernel checks name "logits"/"hidden": say whose
                if type(error) not in (TypeError, ValueError):
                    raise
                raise type(error)(f"in the reference pass ({ref_name}): {error}") from error
        if ref_logps is not None:
            return ref_logps.detach().float()
        return torch.zeros_like(policy.sequence_logps)

    def loss_from_logps(self, policy: FusedLogps, reference: torch.Tensor, vocab: int) -> DPOOutput:
        """Finish the loss from the fused pass of the policy and ``[2B]`` reference log-probs."""
        pi_c, pi_r = split_pairs(self._sequence(policy))
        ref_c, ref_r = split_pairs(reference)
        n_c, n_r = split_pairs(policy.counts)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pi_c,
            pi_r,
            ref_c,
            ref_r,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_counts=n_c,
            rejected_counts=n_r,
            average_log_prob=self.average_log_prob,
            **self.loss_options,
        )
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
    (``[2B]`` precomputed, on the policy's device) or ``reference_free=True``. With
    ``average_log_prob`` the sequence log-probs are per-token means: losses that normalise by
    length use them as they are, and the ``sft`` term stays the mean NLL over all chosen tokens.
    ``inplace_backward`` lets the backward write the gradient into the policy logits' storage
    (for callers that no longer need the logits; backends without it allocate as usual).
    Options are those of :func:`fastdpo.preference_loss`; each bad option is a TypeError/ValueError
    naming it. Deliberate differences from TRL 1.16 (docs/design.md): ``sigmoid`` and ``simpo``
    honour ``label_smoothing`` (cDPO; TRL's CPO trainer), and ``ipo`` / ``sigmoid_norm`` divide by
    the number of scored tokens (TRL 1.16 also counts a completion's first token when the
    completion starts at position 0, where no logit scores it).
    """

    def __init__(self, *args, inplace_backward: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"inplace_backward must be True or False, got {inplace_backward!r}")
        self.inplace_backward = inplace_backward

    def _logps(self, logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False) -> FusedLogps:
        return fused_logps(
            logits,
            labels,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.backend,
            inplace_backward=inplace,
        )

    def forward(
        self,
        policy_logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
        *,
        ref_logps: torch.Tensor | None = None,
    ) -> DPOOutput:
        self._check_reference("ref_logits", ref_logits, ref_logps, "policy_logits", policy_logits)
        policy = self._logps(policy_logits, labels, self.inplace_backward)
        compute = None if ref_logits is None else (lambda: self._logps(ref_logits, labels))
        reference = self._reference(policy, "ref_logits", compute, ref_logps)
        return self.loss_from_logps(policy, reference, policy_logits.shape[-1])


class FusedLinearDPOLoss(_DPOLossBase):
    """:class:`DPOLoss` computed from the last hidden states and the LM head, without logits.

    ``forward(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_logps=None) -> DPOOutput`` gives the same results as
    ``DPOLoss()(hidden @ weight.T + bias, labels, ...)``, but the ``[2B, T, V]`` logits never exist
    (see fastdpo/backends/linear_tiles.py). ``hidden`` is ``[2B, T, H]`` (chosen rows, then rejected
    rows), ``weight`` ``[V, H]``, ``bias`` ``[V]``. The reference is exactly one of
    ``ref_hidden`` (with ``ref_weight`` / ``ref_bias``, which default to the policy's head, for
    a shared frozen head), ``ref_logps`` (``[2B]``) or ``reference_free=True``. Gradients flow to
    ``hidden``, ``weight`` and ``bias``. Options are those of :class:`DPOLoss`, plus
    ``memory_budget_mib``: the float32 softmax tiles the native backend may keep to skip the
    backward's recompute of the logits (fastdpo/linear_dpo.py: per-pair losses only; ``aot*``
    and ``sft`` always recompute; 0 always recomputes; ``None``, the default, allows what the
    float32 logits of the batch would take).
    """

    def __init__(self, *args, memory_budget_mib: float | None = DEFAULT_MEMORY_BUDGET_MIB, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if memory_budget_mib is not None and not memory_budget_mib >= 0:
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
        self._check_reference("ref_hidden", ref_hidden, ref_logps, "hidden", hidden)
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias need ref_hidden (the reference model's hidden states)")
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
        reference = self._reference(policy, "ref_hidden, ref_weight, ref_bias", compute, ref_logps)
        return self.loss_from_logps(policy, reference, weight.shape[0])
