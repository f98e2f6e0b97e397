"""What every backend shares, in one leaf module (it imports nothing from fastdpo): the
``Backend`` record, the label shift and output shapes, the shape rule the fake (meta) kernels
follow, the one backward of the log-prob op, and the Triton launch heuristic.

Backend modules import from here and never from each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    """The kernels of one backend (contract in fastdpo/backends/__init__.py)."""

    name: str
    forward: Callable
    backward: Callable
    lse_fold: Callable
    softmax_grad_tile: Callable
    supports: Callable[[torch.device], bool]  # can this backend run tensors on that device?
    # forward plus the per-token statistics of TokenStatistics (fastdpo/logps.py); a separate
    # kernel so that callers who do not ask for them pay nothing
    forward_statistics: Callable | None = None
    # lse_fold plus the running sums of the token statistics, for the fused linear path
    stats_fold: Callable | None = None


def out_len(time: int, shift: bool) -> int:
    """Positions scored per sequence: under the shift the last logits row has no next label."""
    return time - 1 if shift else time


def scored_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """``[N, T']``: the label each output position scores (logits row t scores label t + 1)."""
    return labels[:, 1:] if shift else labels


def counted_rows(labels: torch.Tensor, ignore_index: int, shift: bool):
    """Indices (n, t) of counted positions, the logits row each one reads, and its label."""
    target = scored_labels(labels, shift)
    n_idx, t_idx = (target != ignore_index).nonzero(as_tuple=True)
    return n_idx, t_idx, target[n_idx, t_idx]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probs, log-sum-exps and upstream gradients are float32 (float64 for float64 logits,
    which only gradcheck passes to the ops; the public API takes 16- and 32-bit floats)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The shape rule of the log-prob ops, as fake (meta) kernels: what torch.compile traces with.


def fake_logps_forward(logits, labels, ignore_index, shift):
    n, time, _ = logits.shape
    stats = dict(dtype=stats_dtype(logits.dtype), device=logits.device)
    per_position = [logits.new_empty(n, out_len(time, shift), **stats) for _ in range(2)]
    per_sequence = [logits.new_empty(n, **stats) for _ in range(2)]
    return (*per_position, *per_sequence)  # token_logps, lse, sequence_logps, logit_sums


def fake_logps_backward(logits, labels, lse, grad_rows, ignore_index, shift):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def fake_logps_backward_(logits, labels, lse, grad_rows, ignore_index, shift):
    return None


# The gradient contract: the one backward of the log-prob op, for every backend and both
# autograd entry points (fastdpo/logps.py and the ops' registered autograd).


def combine_grad_rows(grad_tokens, grad_sequences, shape, dtype, device) -> torch.Tensor:
    """``[N, T']`` upstream gradient of each position's log-prob: the gradient of its own
    output plus its sequence's (a sequence log-prob is the sum of its positions' log-probs)."""
    grad_rows = (
        torch.zeros(shape, dtype=dtype, device=device) if grad_tokens is None else grad_tokens.to(dtype)
    )
    if grad_sequences is not None:
        grad_rows = grad_rows + grad_sequences.to(dtype).unsqueeze(1)
    return grad_rows.contiguous()


def logits_grad(backward, logits, labels, lse, grad_tokens, grad_sequences, ignore_index, shift, inplace):
    """Gradient of the logits from the upstream gradients of (token_logps, sequence_logps),
    by a backend's ``backward`` kernel; ``logit_sums`` is a metric and carries none."""
    grad_rows = combine_grad_rows(grad_tokens, grad_sequences, lse.shape, lse.dtype, lse.device)
    return backward(logits, labels, lse, grad_rows, ignore_index, shift, inplace)


def register_logps_autograd(forward_op, backward) -> None:
    """Autograd for a backend's forward op (so the op can be used, opcheck-ed and gradcheck-ed
    on its own), through :func:`logits_grad` like the public functions."""

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, shift = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.ignore_index, ctx.shift = ignore_index, shift

    def op_backward(ctx, grad_tokens, _grad_lse, grad_sequences, _grad_logit_sums):
        logits, labels, lse = ctx.saved_tensors
        grad = logits_grad(
            backward, logits, labels, lse, grad_tokens, grad_sequences, ctx.ignore_index, ctx.shift, False
        )
        return grad, None, None, None

    torch.library.register_autograd(forward_op, op_backward, setup_context=setup_context)


# Launch heuristic of the Triton kernels (rows and tiles alike).

# Elements of a row one program handles per step. 4096 float32 over 8 warps is 16 elements
# (four 128-bit loads) per thread: enough in flight to saturate memory, few enough registers.
# Under the interpreter the same blocks are numpy vectors, so the heuristic works there too
# (autotuning cannot, since it benchmarks).
MAX_BLOCK_V = 4096
MIN_BLOCK_V = 16


def launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab``: the whole row in one block when it
    fits in ``MAX_BLOCK_V``, else ``MAX_BLOCK_V`` blocks; one warp per 512 elements, 1 to 8."""
    if vocab < 1:
        raise ValueError(f"vocabulary must be non-empty, got {vocab}")
    next_power_of_2 = 1 << (vocab - 1).bit_length()
    block = max(MIN_BLOCK_V, min(MAX_BLOCK_V, next_power_of_2))
    num_warps = max(1, min(8, block // 512))
    return block, num_warps
