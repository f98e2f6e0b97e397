"""``linear_token_logps`` / ``linear_sequence_logps``: DPO log-probs from hidden states and the
LM head, the ``[N, T, V]`` logits never in memory. Argument checks, dispatch and autograd; the
tiled loops are in fastdpo/backends/linear_tiles.py.

Same results as ``token_logps(hidden @ weight.T + bias, labels)`` (computed in float32), and
gradients flow to ``hidden``, ``weight`` and ``bias``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from fastdpo.backends import Backend, linear_tiles, resolve_backend
from fastdpo.backends.common import combine_grad_rows, counted_rows, out_len, scored_labels
from fastdpo.backends.linear_tiles import Rows, TilePlan, plan_tiles
from fastdpo.logps import (
    FLOAT_DTYPES,
    FusedLogps,
    TokenStatistics,
    check_holds_data,
    check_labels,
    check_options,
)


def check_linear_inputs(hidden, weight, bias, labels, ignore_index: int, shift: bool) -> None:
    """Raise a clear TypeError/ValueError for inputs the fused linear path cannot take."""
    named = {"hidden": hidden, "weight": weight} | ({} if bias is None else {"bias": bias})
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_holds_data(name, x)  # before the device comparison, so the culprit is named
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[2]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"weight must have a non-empty vocabulary and hidden size, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    mixed = {x.dtype for x in named.values()}
    if len(mixed) > 1:
        raise TypeError(f"hidden, weight and bias must share one dtype, got {sorted(map(str, mixed))}")
    check_labels(labels, hidden.shape[:2], weight.shape[0], ignore_index, shift, hidden.device, "hidden")


@dataclass(frozen=True)
class _Settings:
    kernels: Backend
    plan: TilePlan
    rows: Rows  # counted positions, derived from the labels
    statistics: bool = False  # also the TokenStatistics, from the same sweep


def _loops(s: _Settings):
    """The module running the tiled loops: the native backend runs all of them in C++ (issue 15,
    fastdpo/backends/native_linear.py); other backends give tile kernels to linear_tiles' loops."""
    if s.kernels.name == "native":
        from fastdpo.backends import native_linear

        return native_linear
    return linear_tiles


def _no_autocast(x: torch.Tensor):
    """The tiles choose their own precision (float32 products and statistics): an enclosing
    autocast region must not turn their matmuls into bfloat16 ones."""
    return torch.autocast(x.device.type, enabled=False)


def _per_sequence(values: torch.Tensor, rows: Rows, n: int) -> torch.Tensor:
    """Sum of per-row values into their sequences, in float64 (order-independent accuracy), as float32."""
    out = torch.zeros(n, dtype=torch.float64, device=values.device)
    return out.index_add_(0, rows.n, values.double()).float()


def _forward(hidden, weight, bias, s: _Settings, positions: int, hidden_grad: torch.Tensor | None):
    """(token_logps, sequence_logps, logit_sums, lse of the counted rows, statistics): the
    statistics are the four ``[N, T']`` fields of TokenStatistics, or none (an empty tuple)."""
    rows = s.rows
    with _no_autocast(hidden):
        label_logit, lse, logit_sum, *per_row = _loops(s).forward_tiles(
            hidden, weight, bias, rows, s.kernels, s.plan, hidden_grad, statistics=s.statistics
        )
    picked = label_logit - lse
    shape = (hidden.shape[0], positions)
    token_logps = _scatter(picked, rows, shape)
    n = hidden.shape[0]
    statistics = ()
    if per_row:  # entropy, log_sum_sq_probs, is_top1 per counted row; then the mean logit
        statistics = (
            *(_scatter(x, rows, shape) for x in per_row),
            _scatter(logit_sum / weight.shape[0], rows, shape),
        )
    return token_logps, _per_sequence(picked, rows, n), _per_sequence(logit_sum, rows, n), lse, statistics


def _scatter(values: torch.Tensor, rows: Rows, shape) -> torch.Tensor:
    """Per counted row values into ``[N, T']``, zeros (False) at ignored positions."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    out[rows.n, rows.t] = values
    return out


class _FusedLinearLogps(torch.autograd.Function):
    """(token_logps, sequence_logps, logit_sums, *statistics) from hidden states and the head;
    see linear_tiles. Only the log-probs carry a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, settings: _Settings, positions: int):
        # d logp / d hidden is finished in the forward sweep, straight into its final buffer.
        hidden_grad = None
        if ctx.needs_input_grad[0]:
            hidden_grad = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        token_logps, sequence_logps, logit_sums, lse, statistics = _forward(
            hidden, weight, bias, settings, positions, hidden_grad
        )
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.settings, ctx.hidden_grad, ctx.positions = settings, hidden_grad, positions
        ctx.mark_non_differentiable(logit_sums, *statistics)
        return token_logps, sequence_logps, logit_sums, *statistics

    @staticmethod
    def backward(ctx, grad_tokens, grad_sequences, *_no_grad_outputs):
        hidden, weight, bias, lse = ctx.saved_tensors
        s: _Settings = ctx.settings
        rows = s.rows
        shape = (hidden.shape[0], ctx.positions)
        grad_rows = combine_grad_rows(grad_tokens, grad_sequences, shape, lse.dtype, lse.device)[
            rows.n, rows.t
        ]
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            if ctx.hidden_grad is None:
                raise RuntimeError(
                    "backward through the fused linear log-probs ran twice: the hidden-state gradient is "
                    "scaled in place in its buffer; recompute the forward instead of retain_graph=True"
                )
            scale = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
            scale[rows.n, rows.t] = grad_rows
            grad_hidden, ctx.hidden_grad = ctx.hidden_grad.mul_(scale.unsqueeze(-1)), None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            with _no_autocast(hidden):
                grad_weight, grad_bias = _loops(s).weight_grad_tiles(
                    hidden,
                    weight,
                    bias,
                    rows,
                    lse,
                    grad_rows,
                    s.kernels,
                    s.plan,
                    need_weight=ctx.needs_input_grad[1],
                    need_bias=ctx.needs_input_grad[2],
                )
        return grad_hidden, grad_weight, grad_bias, None, None


def fused_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    backend: str = "auto",
    row_tile: int | None = None,
    vocab_tile: int | None = None,
    statistics: bool = False,
) -> FusedLogps:
    """Everything the DPO losses need from ``hidden @ weight.T + bias``, without the logits.

    ``hidden`` ``[N, T, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` (one float dtype),
    ``labels`` ``[N, T]``. Returns :class:`fastdpo.logps.FusedLogps` (float32 token log-probs
    ``[N, T']``, sequence sums ``[N]``, counts, logit sums). ``backend`` picks the tile kernels;
    ``row_tile`` / ``vocab_tile`` override the tile shape. ``statistics=True`` also fills
    ``FusedLogps.statistics`` (:class:`fastdpo.logps.TokenStatistics` of the float32 logits
    tiles) from the same forward sweep; without it nothing of them is computed.
    """
    ignore_index = check_options(ignore_index, backend, shift=shift, statistics=statistics)
    for name, size in (("row_tile", row_tile), ("vocab_tile", vocab_tile)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
            raise TypeError(f"{name} must be an int or None, got {type(size).__name__} {size!r}")
    check_linear_inputs(hidden, weight, bias, labels, ignore_index, shift)
    labels = labels.long()
    n, t, v = counted_rows(labels, ignore_index, shift)
    logits_bytes = labels.numel() * weight.shape[0] * hidden.element_size()
    kernels = resolve_backend(backend, hidden.device)
    if kernels.name == "native":  # the C++ loops have their own tile shape (issue 15)
        from fastdpo.backends import native_linear

        plan = native_linear.plan_tiles(hidden.dtype, hidden.shape[-1], row_tile, vocab_tile)
    else:
        plan = plan_tiles(hidden.device, hidden.dtype, hidden.shape[-1], logits_bytes, row_tile, vocab_tile)
    for name, size in (("row_tile", plan.row_tile), ("vocab_tile", plan.vocab_tile)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if statistics:
        _check_statistics_supported(kernels)
    settings = _Settings(kernels, plan, Rows(n, t, v), statistics)
    positions = out_len(labels.shape[1], shift)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        token, sequence, logit_sums, *stats = _FusedLinearLogps.apply(
            hidden, weight, bias, settings, positions
        )
    else:  # no autograd (a reference model, evaluation): no gradient work in the forward either
        token, sequence, logit_sums, _, stats = _forward(hidden, weight, bias, settings, positions, None)
    counts = scored_labels(labels, shift).ne(ignore_index).sum(-1)
    return FusedLogps(token, sequence, counts, logit_sums, TokenStatistics(*stats) if stats else None)


def _check_statistics_supported(kernels: Backend) -> None:
    """The native backend's C++ loops fold the statistics themselves; the loops of linear_tiles
    need the backend's ``stats_fold`` tile kernel."""
    if kernels.name != "native" and kernels.stats_fold is None:
        raise ValueError(f"statistics=True is not implemented by the {kernels.name!r} tile kernels")


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probability of each labelled token under ``hidden @ weight.T + bias``, float32
    ``[N, T-1]`` (``shift``) or ``[N, T]``; 0 where the label is ``ignore_index``."""
    return fused_linear_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift, backend=backend
    ).token_logps


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence sum (or, with ``average``, mean) of the labelled tokens' log-probs under
    ``hidden @ weight.T + bias``, float32 ``[N]``; 0 for a sequence with no counted token."""
    check_options(ignore_index, backend, average=average)
    out = fused_linear_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift, backend=backend
    )
    return out.sequence_logps / out.counts.clamp(min=1) if average else out.sequence_logps
