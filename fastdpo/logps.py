"""``token_logps`` / ``sequence_logps``: argument checks, backend dispatch and autograd.

One fused pass produces the per-token log-probs, the per-sequence sums and the logit sums
for the ``logits/*`` metrics; one backward pass writes the gradient of the logits.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastdpo.backends import Backend, resolve_backend
from fastdpo.backends.common import logits_grad, scored_labels

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_holds_data(name: str, x: torch.Tensor) -> None:
    """Meta tensors carry a shape and no values: nothing here can be computed from them."""
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is a meta tensor (a shape without data); fastdpo computes values, so pass a "
            f"tensor on a real device (under torch.compile the fake tensors are handled for you)"
        )


def may_overlap(x: torch.Tensor) -> bool:
    """True when two indices of ``x`` may address one memory location (an ``expand()``ed or
    ``as_strided`` view). Exact for dense and sliced layouts; a rare interleaved layout that does
    not overlap can be reported as overlapping."""
    reach = 0  # the largest offset the smaller strides can reach
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_options(ignore_index, backend, **flags) -> int:
    """The keyword options of the kernel entry points; returns ``ignore_index`` as an int.

    Type-checked, not coerced: ``shift="no"`` would otherwise count as true and
    ``ignore_index=1.5`` would silently match no label."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:  # compared with int64 labels
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__} {backend!r}")
    return int(ignore_index)


def check_labels(
    labels: torch.Tensor,
    rows: tuple[int, ...],
    vocab: int,
    ignore_index: int,
    shift: bool,
    device: torch.device,
    scores: str = "logits",
) -> None:
    """Labels ``[N, T]`` integer on ``device``, matching ``rows`` = (N, T) of what ``scores`` them,
    and every counted one inside ``[0, vocab)``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError("labels must be a torch.Tensor")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(rows):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {scores} [N, T] = {tuple(rows)}")
    if rows[1] == 0:
        raise ValueError(f"sequences must not be empty, got {scores} [N, T] = {tuple(rows)}")
    if shift and rows[1] < 2:
        raise ValueError("shift=True needs sequences of at least 2 positions (T >= 2)")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {scores} are on {device}")
    target = scored_labels(labels, shift)
    outside = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if outside.any():  # the one device sync of a forward (a boolean index would add another)
        bad = target[outside][0].item()
        raise ValueError(f"label {bad} is outside [0, {vocab}) and is not ignore_index ({ignore_index})")


def check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool, inplace_backward: bool = False
) -> None:
    """Raise a clear TypeError/ValueError for inputs the kernels cannot take."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError("logits must be a torch.Tensor")
    check_holds_data("logits", logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary, got {tuple(logits.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must have a contiguous last (vocabulary) dimension")
    if inplace_backward and may_overlap(logits):
        # Each element would receive the gradient of every index that aliases it, written over
        # the logits the other indices still have to read.
        raise ValueError(
            f"inplace_backward=True writes the gradient into logits, but their elements overlap in "
            f"memory (shape {tuple(logits.shape)}, strides {logits.stride()}, e.g. from expand()); "
            f"pass logits.contiguous() or use inplace_backward=False"
        )
    check_labels(labels, logits.shape[:2], logits.shape[-1], ignore_index, shift, logits.device)


@dataclass(frozen=True)
class _Settings:
    backend: Backend
    ignore_index: int
    shift: bool
    inplace_backward: bool
    statistics: bool = False


class _FusedLogps(torch.autograd.Function):
    """(token_logps, sequence_logps, logit_sums, *statistics) from one kernel pass; one pass back."""

    @staticmethod
    def forward(ctx, logits, labels, settings: _Settings):
        kernel = settings.backend.forward_statistics if settings.statistics else settings.backend.forward
        token_logps, lse, sequence_logps, *rest = kernel(
            logits, labels, settings.ignore_index, settings.shift
        )
        ctx.settings = settings
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(*rest)
        return token_logps, sequence_logps, *rest

    @staticmethod
    def backward(ctx, grad_tokens, grad_sequences, *_no_grad_outputs):
        logits, labels, lse = ctx.saved_tensors
        s: _Settings = ctx.settings
        grad = logits_grad(
            s.backend.backward,
            logits,
            labels,
            lse,
            grad_tokens,
            grad_sequences,
            s.ignore_index,
            s.shift,
            s.inplace_backward,
        )
        return grad, None, None


class TokenStatistics(NamedTuple):
    """Per-position statistics of the next-token distribution ``p = softmax(row)`` (float32
    row), ``[N, T']``, 0 / False where the label is ignored; no gradient flows through them.
    They are what TRL's metrics and losses read besides the log-probs: the ``entropy`` metric,
    ``log_sum_sq_probs`` for WPO's weights (``use_weighting``), ``is_top1`` for
    ``mean_token_accuracy``."""

    entropy: torch.Tensor  # float32: -sum_v p_v log p_v
    log_sum_sq_probs: torch.Tensor  # float32: log sum_v p_v^2
    is_top1: torch.Tensor  # bool: the label is the row's first maximum (as argmax counts it)
    mean_logits: torch.Tensor  # float32: mean of the row's logits over the vocabulary


class FusedLogps(NamedTuple):
    token_logps: torch.Tensor  # [N, T'] float32
    sequence_logps: torch.Tensor  # [N] float32 sums
    counts: torch.Tensor  # [N] int64: counted tokens per sequence
    logit_sums: torch.Tensor  # [N] float32: sum of logits over counted rows and the vocabulary
    statistics: TokenStatistics | None = None  # only when asked for (statistics=True)


def fused_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    backend: str = "auto",
    inplace_backward: bool = False,
    statistics: bool = False,
) -> FusedLogps:
    """Everything the DPO losses need from the logits, in one pass (see :class:`FusedLogps`).

    ``statistics=True`` also returns :class:`TokenStatistics` from the same pass (the logits
    are still read once); without it nothing of them is computed.

    ``inplace_backward=True`` writes the gradient of the logits into their own storage (no
    second ``[N, T, V]`` buffer). The logits must then not alias themselves (an ``expand()``ed
    tensor is refused) and must not be needed afterwards: the write bumps their version
    counter, so autograd raises if anything saved them (a second backward with
    ``retain_graph=True``, an earlier op that saved the logits) rather than reading gradients.
    """
    ignore_index = check_options(
        ignore_index, backend, shift=shift, inplace_backward=inplace_backward, statistics=statistics
    )
    check_inputs(logits, labels, ignore_index, shift, inplace_backward)
    labels = labels.long()
    chosen = resolve_backend(backend, logits.device)
    if statistics and chosen.forward_statistics is None:
        raise ValueError(f"statistics=True is not implemented by the {chosen.name!r} backend yet")
    settings = _Settings(chosen, ignore_index, shift, inplace_backward, statistics)
    token, sequence, logit_sums, *stats = _FusedLogps.apply(logits, labels, settings)
    counts = (scored_labels(labels, shift) != ignore_index).sum(-1)
    return FusedLogps(token, sequence, counts, logit_sums, TokenStatistics(*stats) if stats else None)


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probability of each labelled token, float32 ``[N, T-1]`` (``shift``) or ``[N, T]``.

    ``logits`` ``[N, T, V]`` float32/bfloat16/float16 with a contiguous last dim; ``labels``
    ``[N, T]`` integer. Entries whose label is ``ignore_index`` are 0. Differentiable w.r.t.
    ``logits`` (the gradient has ``logits.dtype``).
    """
    return fused_logps(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend).token_logps


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence sum (or, with ``average``, mean) of the labelled tokens' log-probs, float32 ``[N]``.

    Sequences with no counted token give 0 (never NaN) and a zero gradient.
    """
    check_options(ignore_index, backend, average=average)
    out = fused_logps(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend)
    if average:
        return out.sequence_logps / out.counts.clamp(min=1)
    return out.sequence_logps
