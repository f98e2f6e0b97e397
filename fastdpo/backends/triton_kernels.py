"""The ``triton`` backend: fused log-softmax-gather kernels for CUDA, written in Triton.

Semantics are the backend contract in fastdpo/backends/__init__.py; the byte counts and the
design are argued in docs/triton.md. In short:

- forward: one program per output position; ignored positions write zeros after reading only
  their label. Counted ones stream the logits row once in ``BLOCK_V`` blocks with an online
  max / sum of exponentials in float32 and write the token log-prob, the row's log-sum-exp and
  the row's logit sum. The per-sequence sums are then reduced by ``torch.sum`` over the
  ``[N, T']`` rows in float64: a fixed order, no atomics, so results are bitwise reproducible.
- forward_statistics: the same kernel with its compile-time ``STATISTICS`` flag on, which also
  folds the token statistics (entropy, log sum p^2, first-maximum top-1, mean logit) into the
  same online pass over the row; with the flag off that work compiles away.
- backward: one program per (logits row, vocabulary block): ``g * (onehot(label) - exp(x - lse))``,
  one read and one write per element; rows that score nothing get zeros without being read.

All row offsets are computed in int64 (``N * T * V`` passes 2**31 at Llama-3 vocabularies).

The kernels are registered as ``fastdpo::triton_logps_forward``, ``triton_logps_forward_statistics``,
``triton_logps_backward`` and ``triton_logps_backward_`` (in place) through ``torch.library.triton_op`` + ``wrap_triton``,
so ``torch.compile`` sees the kernels themselves. Under ``TRITON_INTERPRET=1`` (the CPU
interpreter the tests use) there is no compiled kernel for the compiler to see and
``wrap_triton`` cannot trace an interpreted one, so the same functions are registered as
opaque ``torch.library.custom_op``s with fake implementations instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastdpo.backends import triton_tiles  # the fused linear path's tile kernels, same backend
from fastdpo.backends.common import (
    Backend,
    fake_logps_backward,
    fake_logps_backward_,
    fake_logps_forward,
    launch_config,
    out_len,
    register_logps_autograd,
    stats_dtype,
)


@triton.jit
def _row_offset(n, t, stride_n, stride_t):
    """Element offset of logits row (n, t), in int64 whatever the types of the indices."""
    return n.to(tl.int64) * stride_n + t.to(tl.int64) * stride_t


@triton.jit
def _forward_kernel(
    logits_ptr,
    labels_ptr,
    token_ptr,
    lse_ptr,
    row_sum_ptr,
    entropy_ptr,
    log_sum_sq_ptr,
    top1_ptr,
    mean_ptr,
    T,
    T_out,
    V,
    stride_n,
    stride_t,
    ignore_index,
    SHIFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STATISTICS: tl.constexpr,
):
    """One output position. With ``STATISTICS`` also the token statistics, in the same one read of
    the row (a compile-time flag: without it the statistics' work and pointers compile away, and
    the shared quantities m, s, total, lse are the same expressions, so the same bits)."""
    pos = tl.program_id(0).to(tl.int64)  # output position n * T_out + t
    n = pos // T_out
    t = pos - n * T_out
    # The shift is an index: logits row t scores label t + 1.
    label = tl.load(labels_ptr + n * T + t + SHIFT)
    if label == ignore_index:
        # Nothing to score: the row is never read (it may hold anything, NaN included).
        tl.store(token_ptr + pos, 0.0)
        tl.store(lse_ptr + pos, 0.0)
        tl.store(row_sum_ptr + pos, 0.0)
        if STATISTICS:
            tl.store(entropy_ptr + pos, 0.0)
            tl.store(log_sum_sq_ptr + pos, 0.0)
            tl.store(top1_ptr + pos, 0)
            tl.store(mean_ptr + pos, 0.0)
    else:
        row_ptr = logits_ptr + _row_offset(n, t, stride_n, stride_t)
        # Online log-sum-exp: a running max m and sum s of e = exp(x - m), rescaled when m grows,
        # so each element is loaded once and exponentiated once, all in float32. The statistics
        # add w = sum e (x - m) and q = sum e^2, rescaled as m grows to m' (r = exp(m - m')):
        # w' = r (w + (m - m') s) and q' = r^2 q; then entropy = log s - w / s and
        # log sum p^2 = log q - 2 log s.
        m = -float("inf")
        s = 0.0
        total = 0.0
        w = 0.0
        q = 0.0
        top = 0  # first index of the running max (argmax's answer for an all -inf row too)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            x = tl.load(row_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            if STATISTICS:
                # Strictly greater replaces: an equal maximum in a later block is not the first
                # one. Padding (-inf, past V) never wins: a block's first column is in the row.
                block_top = tl.min(tl.where(x == block_max, cols, V), axis=0)
                top = tl.where(block_max > m, block_top, top)
            m_new = tl.maximum(m, block_max)
            # Subtract 0 while every logit so far is -inf (a masked vocabulary block): the terms
            # are then exp(-inf) = 0, where subtracting -inf would give exp(-inf - -inf) = NaN.
            offset = tl.where(m_new == -float("inf"), 0.0, m_new)
            rescale = tl.exp(m - offset)
            e = tl.exp(x - offset)
            if STATISTICS:
                # (m - m') s is 0 while s is (m = -inf), and a masked entry (e = 0, x - offset =
                # -inf) adds 0 to w: the -inf is selected away before it is multiplied.
                w_shift = tl.where(m == -float("inf"), 0.0, m - offset) * s
                centred = tl.where(e > 0.0, x - offset, 0.0)
                w = rescale * (w + w_shift) + tl.sum(e * centred, axis=0)
                q = rescale * rescale * q + tl.sum(e * e, axis=0)
            s = s * rescale + tl.sum(e, axis=0)
            total += tl.sum(tl.where(in_row, x, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # One element, just streamed through the cache. Masked so that a label outside [0, V)
        # (the public API rejects those before launching) gives NaN, not an out-of-bounds read.
        label_ok = (label >= 0) & (label < V)
        x_label = tl.load(row_ptr + label, mask=label_ok, other=float("nan")).to(tl.float32)
        tl.store(token_ptr + pos, x_label - lse)
        tl.store(lse_ptr + pos, lse)
        tl.store(row_sum_ptr + pos, total)
        if STATISTICS:
            log_s = tl.log(s)
            tl.store(entropy_ptr + pos, log_s - w / s)
            tl.store(log_sum_sq_ptr + pos, tl.log(q) - 2.0 * log_s)
            tl.store(top1_ptr + pos, (top == label).to(tl.uint8))
            tl.store(mean_ptr + pos, total / V)


@triton.jit
def _backward_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_rows_ptr,
    grad_ptr,
    T,
    T_out,
    V,
    stride_n,
    stride_t,
    grad_stride_n,
    grad_stride_t,
    ignore_index,
    SHIFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # logits row n * T + t
    n = row // T
    t = row - n * T
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    out_ptr = grad_ptr + _row_offset(n, t, grad_stride_n, grad_stride_t) + cols
    # Under the shift the last row scores nothing (its label would be past the end).
    scored = t < T_out
    label = tl.load(labels_ptr + n * T + t + SHIFT, mask=scored, other=ignore_index)
    if label == ignore_index:
        tl.store(out_ptr, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=in_row)
    else:
        pos = n * T_out + t
        g = tl.load(grad_rows_ptr + pos)
        lse = tl.load(lse_ptr + pos)
        row_ptr = logits_ptr + _row_offset(n, t, stride_n, stride_t)
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        # d log_softmax(x)[label] / dx = onehot(label) - softmax(x), softmax from the saved lse.
        grad = -g * tl.exp(x - lse)
        grad = tl.where(cols == label, grad + g, grad)
        # In place, out_ptr is this same block of logits: read above, written once here.
        tl.store(out_ptr, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _launch_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool, statistics=None
):
    """Run the forward kernel (one program per output position) and reduce its per-row results:
    (token_logps, lse, sequence_logps, logit_sums). ``statistics``: the four ``[N, T']`` outputs
    of the token statistics (entropy, log sum p^2, is_top1, mean logit) to fill, or None."""
    n, time, vocab = logits.shape
    out_t = out_len(time, shift)
    stats = dict(dtype=stats_dtype(logits.dtype), device=logits.device)
    token_logps, lse, row_sums = (torch.empty(n, out_t, **stats) for _ in range(3))
    if n * out_t > 0:
        # Without statistics their pointers are never dereferenced (compiled away): any tensor will do.
        entropy, log_sum_sq, is_top1, mean_logits = statistics or (token_logps,) * 4
        block, warps = launch_config(vocab)
        wrap_triton(_forward_kernel)[(n * out_t,)](
            logits_ptr=logits,
            labels_ptr=labels,
            token_ptr=token_logps,
            lse_ptr=lse,
            row_sum_ptr=row_sums,
            entropy_ptr=entropy,
            log_sum_sq_ptr=log_sum_sq,
            # bytes 0 / 1: a bool tensor's storage
            top1_ptr=is_top1.view(torch.uint8) if is_top1.dtype == torch.bool else is_top1,
            mean_ptr=mean_logits,
            T=time,
            T_out=out_t,
            V=vocab,
            stride_n=logits.stride(0),
            stride_t=logits.stride(1),
            ignore_index=ignore_index,
            SHIFT=int(shift),
            BLOCK_V=block,
            STATISTICS=statistics is not None,
            num_warps=warps,
        )
    # Deterministic reduction: a plain sum over rows in float64 (a few bytes per position).
    sequence_logps = token_logps.sum(-1, dtype=torch.float64).to(token_logps.dtype)
    logit_sums = row_sums.sum(-1, dtype=torch.float64).to(token_logps.dtype)
    return token_logps, lse, sequence_logps, logit_sums


def _forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # custom_op reads the annotation
    return _launch_forward(logits, labels, ignore_index, shift)


def _forward_statistics(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    n, time, _ = logits.shape
    per_position = dict(size=(n, out_len(time, shift)), device=logits.device)
    entropy, log_sum_sq, mean_logits = (torch.empty(**per_position, dtype=torch.float32) for _ in range(3))
    is_top1 = torch.empty(**per_position, dtype=torch.bool)
    statistics = (entropy, log_sum_sq, is_top1, mean_logits)
    return (*_launch_forward(logits, labels, ignore_index, shift, statistics), *statistics)


def _fake_forward_statistics(logits, labels, ignore_index, shift):
    n, time, _ = logits.shape
    per_position = dict(size=(n, out_len(time, shift)), device=logits.device)
    f32 = [torch.empty(**per_position, dtype=torch.float32) for _ in range(3)]
    is_top1 = torch.empty(**per_position, dtype=torch.bool)
    return (*fake_logps_forward(logits, labels, ignore_index, shift), f32[0], f32[1], is_top1, f32[2])


def _launch_backward(logits, labels, lse, grad_rows, ignore_index, shift, grad) -> None:
    n, time, vocab = logits.shape
    if n * time == 0:
        return
    block, warps = launch_config(vocab)
    grid = (n * time, triton.cdiv(vocab, block))
    wrap_triton(_backward_kernel)[grid](
        logits_ptr=logits,
        labels_ptr=labels,
        lse_ptr=lse,
        grad_rows_ptr=grad_rows,
        grad_ptr=grad,  # the logits themselves when in place
        T=time,
        T_out=out_len(time, shift),
        V=vocab,
        stride_n=logits.stride(0),
        stride_t=logits.stride(1),
        grad_stride_n=grad.stride(0),
        grad_stride_t=grad.stride(1),
        ignore_index=ignore_index,
        SHIFT=int(shift),
        BLOCK_V=block,
        num_warps=warps,
    )


def _backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    shift: bool,
) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_backward(logits, labels, lse, grad_rows, ignore_index, shift, grad)
    return grad


def _backward_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    shift: bool,
) -> None:
    _launch_backward(logits, labels, lse, grad_rows, ignore_index, shift, logits)


INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)
_ops = None


def _define(name: str, fn, fake, mutates_args=()):
    """A ``triton_op`` when the kernels compile; under the interpreter an opaque ``custom_op``."""
    if not INTERPRETED:
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def define_ops():
    """Define the four ops once, with autograd for the forward op (so it works on its own). The
    statistics op has none of its own: fastdpo/logps.py differentiates it (its statistics carry
    no gradient)."""
    global _ops
    if _ops is None:
        forward_op = _define("fastdpo::triton_logps_forward", _forward, fake_logps_forward)
        backward_op = _define("fastdpo::triton_logps_backward", _backward, fake_logps_backward)
        inplace_op = _define("fastdpo::triton_logps_backward_", _backward_, fake_logps_backward_, ("logits",))
        statistics_op = _define(
            "fastdpo::triton_logps_forward_statistics", _forward_statistics, _fake_forward_statistics
        )
        _ops = (forward_op, backward_op, inplace_op, statistics_op)
        register_logps_autograd(forward_op, backward)
    return _ops


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    forward_op = define_ops()[0]
    return forward_op(logits, labels.contiguous(), ignore_index, shift)


def forward_statistics(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    statistics_op = define_ops()[3]
    return statistics_op(logits, labels.contiguous(), ignore_index, shift)


def backward(logits, labels, lse, grad_rows, ignore_index, shift, inplace=False):
    _, backward_op, backward_op_, _ = define_ops()
    labels, lse, grad_rows = labels.contiguous(), lse.contiguous(), grad_rows.contiguous()
    if inplace:
        backward_op_(logits, labels, lse, grad_rows, ignore_index, shift)
        return logits
    return backward_op(logits, labels, lse, grad_rows, ignore_index, shift)


def supports(device: torch.device) -> bool:
    """CUDA tensors with compiled kernels; CPU tensors only under ``TRITON_INTERPRET=1``
    (which must be set before triton is first imported, as triton reads it then)."""
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


# Defining the ops costs about a second (triton_op reads the kernels' source): done once, here,
# where they can run; on a machine where they cannot, ``available_backends()`` does not pay it.
if INTERPRETED or torch.cuda.is_available():
    define_ops()


def load() -> Backend:
    return Backend(
        "triton",
        forward,
        backward,
        triton_tiles.lse_fold,
        triton_tiles.softmax_grad_tile,
        supports=supports,
        forward_statistics=forward_statistics,
        stats_fold=triton_tiles.stats_fold,
    )
