"""``DPOLoss`` (on logits) and ``FusedLinearDPOLoss`` (on hidden states and the LM head): the DPO
loss family with TRL's batch layout and metric names."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastdpo.backends.common import scored_labels
from fastdpo.functional import (
    check_ld_alpha,
    check_loss_options,
    check_number,
    check_use_weighting,
    length_desensitized_logps,
    preference_loss,
    wpo_weights,
)
from fastdpo.linear import fused_linear_logps
from fastdpo.linear_dpo import loss_in_forward
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
    # With token_metrics=True: 0-dim float64 sums over the counted tokens (see token_sums), from
    # which metric_tensors() gives TRL's entropy and mean_token_accuracy; a trainer adds them up
    # over micro-batches and ranks before dividing.
    token_sums: dict[str, torch.Tensor] | None = None

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """TRL's DPOTrainer metrics (batch means) as detached 0-dim tensors, without a device sync."""
        chosen, rejected = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        missing = torch.full((), float("nan"), device=chosen.device)
        tokens = {} if self.token_sums is None else token_means(self.token_sums)
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": self.policy_chosen_logps.detach().mean(),
            "logps/rejected": self.policy_rejected_logps.detach().mean(),
            "logits/chosen": missing if self.mean_chosen_logit is None else self.mean_chosen_logit,
            "logits/rejected": missing if self.mean_rejected_logit is None else self.mean_rejected_logit,
            **tokens,
        }

    def metrics(self) -> dict[str, float]:
        """:meth:`metric_tensors` as floats, in one transfer to the host (call it when logging)."""
        tensors = self.metric_tensors()
        values = torch.stack([t.double() for t in tensors.values()]).tolist()
        return dict(zip(tensors, values))


def token_sums(policy: FusedLogps) -> dict[str, torch.Tensor]:
    """What TRL's ``entropy`` and ``mean_token_accuracy`` are made of, as 0-dim float64 sums (no
    sync): the entropy summed over every counted token, the number of those tokens, and, over the
    chosen rows only (TRL's accuracy is the chosen completions'), the top-1 hits and the tokens.
    The statistics are 0 / False at ignored positions, so row sums are sums over counted tokens."""
    stats, counts = policy.statistics, policy.counts
    pairs = counts.shape[0] // 2
    return {
        "entropy_sum": stats.entropy.sum(dtype=torch.float64),
        "tokens": counts.sum().double(),
        "top1_chosen": stats.is_top1[:pairs].sum().double(),
        "chosen_tokens": counts[:pairs].sum().double(),
    }


def token_means(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``entropy`` (mean over every counted token) and ``mean_token_accuracy`` (top-1 rate over the
    chosen completions' tokens) from :func:`token_sums` (or their total); 0 where no token counts, as TRL."""

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), 0.0)

    return {
        "entropy": ratio(sums["entropy_sum"], sums["tokens"]),
        "mean_token_accuracy": ratio(sums["top1_chosen"], sums["chosen_tokens"]),
    }


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
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        token_metrics: bool = False,
        shift: bool = True,
    ) -> None:
        super().__init__()
        more = dict(
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
        )
        types, _ = check_loss_options(
            loss_type, loss_weights, beta, label_smoothing, f_divergence_type, **more
        )
        check_use_weighting(use_weighting, types)
        self.ld_alpha = check_ld_alpha(ld_alpha)
        for name, flag in (
            ("reference_free", reference_free),
            ("average_log_prob", average_log_prob),
            ("token_metrics", token_metrics),
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
        self.loss_types, self.use_weighting, self.token_metrics = types, use_weighting, token_metrics

    @property
    def needs_statistics(self) -> bool:
        """Whether the policy pass must return token statistics (WPO's weights, the token metrics);
        when False the kernels compute none of them."""
        return self.use_weighting or self.token_metrics

    def _counted(self, labels: torch.Tensor) -> torch.Tensor | None:
        """``[2B, T']`` scored positions, which LD-DPO's split needs (None without ``ld_alpha``)."""
        if self.ld_alpha is None:
            return None
        return scored_labels(labels, self.shift) != self.ignore_index

    def _sequence(self, out: FusedLogps, counted: torch.Tensor | None = None) -> torch.Tensor:
        """``[2B]`` log-probs the losses compare: summed (LD-DPO's weighted sum when ``counted`` is
        given), or per-token means with ``average_log_prob``."""
        logps = out.sequence_logps
        if counted is not None:
            logps = length_desensitized_logps(out.token_logps, counted, self.ld_alpha)
        return logps / out.counts.clamp(min=1) if self.average_log_prob else logps

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

    def _reference(self, policy: FusedLogps, ref_name: str, compute, ref_logps, counted=None) -> torch.Tensor:
        """``[2B]`` reference log-probs: ``compute()`` (a fused pass, run without autograd),
        precomputed ``ref_logps`` (taken as given: with ``ld_alpha`` they must be LD-DPO's
        weighted sums, as TRL's precomputed ones are), or zeros when reference-free."""
        if compute is not None:
            try:
                with torch.no_grad():
                    return self._sequence(compute(), counted)
            except (TypeError, ValueError) as error:  # the kernel checks name "logits"/"hidden": say whose
                if type(error) not in (TypeError, ValueError):
                    raise
                raise type(error)(f"in the reference pass ({ref_name}): {error}") from error
        if ref_logps is not None:
            return ref_logps.detach().float()
        return torch.zeros_like(policy.sequence_logps)

    def loss_from_logps(
        self, policy: FusedLogps, reference: torch.Tensor, vocab: int, counted: torch.Tensor | None = None
    ) -> DPOOutput:
        """Finish the loss from the fused pass of the policy and ``[2B]`` reference log-probs
        (``counted``: the scored positions, needed with ``ld_alpha``)."""
        pi_c, pi_r = split_pairs(self._sequence(policy, counted))
        ref_c, ref_r = split_pairs(reference)
        n_c, n_r = split_pairs(policy.counts)
        sft_c = None  # with ld_alpha, sft stays the plain NLL of the chosen tokens (as TRL's)
        if counted is not None and "sft" in self.loss_types:
            sft_c = split_pairs(self._sequence(policy))[0]
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
            sft_chosen_logps=sft_c,
            **self.loss_options,
        )
        if self.use_weighting:  # WPO: each pair's loss times its (gradient-free) weight, as TRL
            losses = losses * wpo_weights(
                policy.token_logps, policy.statistics.log_sum_sq_probs, policy.counts
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
            token_sums=token_sums(policy) if self.token_metrics else None,
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
    Options are those of :func:`fastdpo.preference_loss`, plus three that read per-token outputs,
    as TRL 1.16's ``DPOTrainer`` defines them (fastdpo/functional.py):

    - ``use_weighting`` (WPO): each pair's loss times ``w_c * w_r``, ``w = exp(mean over the
      row's scored tokens of log p(token) - log sum_v p_v^2)``, without gradient; not with
      ``aot*`` (they sort the pairs). Asks the kernel for token statistics (same pass).
    - ``ld_alpha`` (LD-DPO, in ``[0, 1]``, None: off): the log-probs of both policy and
      reference become the sum over each row's first ``min(chosen, rejected)`` scored tokens
      plus ``ld_alpha`` times the rest; ``sft`` keeps the plain NLL. Precomputed ``ref_logps``
      are taken as given, so compute them with the same ``ld_alpha``.
    - ``token_metrics``: ``DPOOutput.metrics()`` also gives TRL's ``entropy`` (mean over every
      scored token) and ``mean_token_accuracy`` (top-1 rate over the chosen tokens), from token
      statistics of the same pass; off, the kernels compute none. (TRL's ``num_tokens`` counts
      prompt and completion tokens, which the labels do not say: the trainer logs it.)

    Each bad option is a TypeError/ValueError naming it. Deliberate differences from TRL 1.16
    (docs/design.md): ``sigmoid`` and ``simpo`` honour ``label_smoothing`` (cDPO; TRL's CPO
    trainer), and ``ipo`` / ``sigmoid_norm`` divide by the number of scored tokens (TRL 1.16 also
    counts a completion's first token when the completion starts at position 0, where no logit
    scores it).
    """

    def __init__(self, *args, inplace_backward: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(inplace_backward, bool):
            raise TypeError(f"inplace_backward must be True or False, got {inplace_backward!r}")
        self.inplace_backward = inplace_backward

    def _logps(
        self, logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False, statistics: bool = False
    ) -> FusedLogps:
        return fused_logps(
            logits,
            labels,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.backend,
            inplace_backward=inplace,
            statistics=statistics,
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
        policy = self._logps(policy_logits, labels, self.inplace_backward, self.needs_statistics)
        counted = self._counted(labels)  # after the pass, which checked the labels
        compute = None if ref_logits is None else (lambda: self._logps(ref_logits, labels))
        reference = self._reference(policy, "ref_logits", compute, ref_logps, counted)
        return self.loss_from_logps(policy, reference, policy_logits.shape[-1], counted)


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
    ``memory_budget_mib``: the softmax tiles the native backend may keep to skip the
    backward's recompute of the logits, for as many rows as fit (fastdpo/linear_dpo.py: per-pair
    losses only; ``aot*`` and ``sft`` always recompute, and so do ``use_weighting``, ``ld_alpha``
    and ``token_metrics``, whose per-token outputs that kernel does not make; 0 always
    recomputes; ``None``, the default, allows a quarter of what the float32 logits of the batch
    would take).
    """

    def __init__(self, *args, memory_budget_mib: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if memory_budget_mib is not None and check_number("memory_budget_mib", memory_budget_mib) < 0:
            raise ValueError(f"memory_budget_mib must be >= 0, got {memory_budget_mib}")
        self.memory_budget_mib = memory_budget_mib

    def _logps(self, hidden, weight, labels, bias, statistics: bool = False) -> FusedLogps:
        return fused_linear_logps(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            shift=self.shift,
            backend=self.backend,
            statistics=statistics,  # computed only when asked for
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
        policy = self._logps(hidden, weight, labels, bias, self.needs_statistics)
        counted = self._counted(labels)
        reference = self._reference(policy, "ref_hidden, ref_weight, ref_bias", compute, ref_logps, counted)
        return self.loss_from_logps(policy, reference, weight.shape[0], counted)
