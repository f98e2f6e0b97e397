"""Triton tile kernels of the fused linear path (contract in fastdpo/backends/__init__.py).

The fused linear path (fastdpo/backends/linear_tiles.py) computes a float32 tile ``[rows, vocabulary
block]`` of the projection with a matmul, then calls these kernels for the element-wise work:
one program per tile row, the row streamed in ``BLOCK`` pieces, all math in float32.

- ``lse_fold``: sweep 1 reads the row for its max and logit sum; sweep 2 reads it again (from
  L2: a row is at most a few tens of KB) and writes ``exp(x - new_max)`` over it.
- ``stats_fold``: the same kernel with its ``STATISTICS`` flag (a compile-time constant, so
  ``lse_fold`` compiles without the extra work): sweep 1 also finds the first maximum, sweep 2
  also sums ``e (x - new_max)`` and ``e^2``.
- ``softmax_grad_tile``: one sweep, ``g * (onehot(label) - exp(x - lse))`` written over the row.

Offsets are int64 (``rows * row_stride`` can pass 2**31 for large tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdpo.backends.common import launch_config


@triton.jit
def _lse_fold_kernel(
    tile_ptr,
    stride,
    cols,
    max_ptr,
    sum_ptr,
    new_max_ptr,
    new_sum_ptr,
    rescale_ptr,
    logit_sum_ptr,
    weighted_ptr,
    sq_ptr,
    new_weighted_ptr,
    new_sq_ptr,
    top_ptr,
    BLOCK: tl.constexpr,
    STATISTICS: tl.constexpr,
):
    """``lse_fold``; with ``STATISTICS`` also ``stats_fold``'s running sums and first maximum.
    The flag is a compile-time constant: the plain fold's kernel has none of the extra work."""
    r = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + r * stride
    m_tile = -float("inf")
    total = 0.0
    top = 0  # first column of the tile's max (strictly greater replaces: equal keeps the earlier)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < cols, other=-float("inf"))
        block_max = tl.max(x, axis=0)
        if STATISTICS:
            top = tl.where(block_max > m_tile, tl.min(tl.where(x == block_max, offs, cols), axis=0), top)
        m_tile = tl.maximum(m_tile, block_max)
        total += tl.sum(tl.where(offs < cols, x, 0.0), axis=0)
    m_old = tl.load(max_ptr + r)
    m = tl.maximum(m_old, m_tile)
    # Subtract 0 while the row is all -inf (running max -inf, running sum empty): the rescale and
    # the tile's terms are then exp(-inf) = 0, never exp(-inf - -inf) = NaN.
    offset = tl.where(m == -float("inf"), 0.0, m)
    rescale = tl.exp(m_old - offset)
    exp_sum = 0.0
    weighted = 0.0  # sum e (x - offset) and sum e^2 over the tile (STATISTICS only)
    sq = 0.0
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < cols
        x = tl.load(row_ptr + offs, mask=in_row, other=-float("inf"))
        e = tl.exp(x - offset)
        tl.store(row_ptr + offs, e, mask=in_row)
        exp_sum += tl.sum(e, axis=0)
        if STATISTICS:
            # A masked entry (e = 0, x - offset = -inf) adds 0: the -inf is selected away first.
            weighted += tl.sum(e * tl.where(e > 0.0, x - offset, 0.0), axis=0)
            sq += tl.sum(e * e, axis=0)
    sum_old = tl.load(sum_ptr + r)
    tl.store(new_max_ptr + r, m)
    tl.store(new_sum_ptr + r, sum_old * rescale + exp_sum)
    tl.store(rescale_ptr + r, rescale)
    tl.store(logit_sum_ptr + r, total)
    if STATISTICS:
        # The old sums are relative to m_old: moved to m they gain (m_old - m) per unit of sum,
        # which is 0 while the sum is empty (m_old = -inf; never -inf * 0).
        w_shift = tl.where(m_old == -float("inf"), 0.0, m_old - offset) * sum_old
        tl.store(new_weighted_ptr + r, rescale * (tl.load(weighted_ptr + r) + w_shift) + weighted)
        tl.store(new_sq_ptr + r, rescale * rescale * tl.load(sq_ptr + r) + sq)
        tl.store(top_ptr + r, top.to(tl.int64))


@triton.jit
def _softmax_grad_tile_kernel(tile_ptr, stride, cols, labels_ptr, lse_ptr, grad_ptr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + r * stride
    label = tl.load(labels_ptr + r)
    lse = tl.load(lse_ptr + r)
    g = tl.load(grad_ptr + r)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < cols
        x = tl.load(row_ptr + offs, mask=in_row, other=0.0)
        grad = -g * tl.exp(x - lse)
        # A label outside [0, cols) belongs to another vocabulary block and matches no column here.
        grad = tl.where(offs == label, grad + g, grad)
        tl.store(row_ptr + offs, grad, mask=in_row)


def _check_tile(tile: torch.Tensor) -> None:
    if tile.dtype != torch.float32 or tile.dim() != 2 or tile.stride(1) != 1:
        raise ValueError(
            f"tile must be a 2-D float32 tensor with contiguous rows, got {tile.dtype} {tuple(tile.shape)}"
        )


def lse_fold(tile: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor):
    return _fold(tile, running_max, running_sum, None)[:4]


def stats_fold(
    tile: torch.Tensor,
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    running_weighted: torch.Tensor,
    running_sq: torch.Tensor,
):
    return _fold(tile, running_max, running_sum, (running_weighted, running_sq))


def _fold(tile, running_max, running_sum, statistics):
    _check_tile(tile)
    rows, cols = tile.shape
    new_max, new_sum, rescale, logit_sum = (torch.empty_like(running_max) for _ in range(4))
    if statistics is None:  # the kernel never touches these pointers: any float32 tensor will do
        weighted = sq = new_weighted = new_sq = top = new_max
    else:
        weighted, sq = (x.contiguous() for x in statistics)
        new_weighted, new_sq = torch.empty_like(running_max), torch.empty_like(running_max)
        top = torch.empty(rows, dtype=torch.int64, device=tile.device)
    if rows:
        block, warps = launch_config(cols)
        _lse_fold_kernel[(rows,)](
            tile_ptr=tile,
            stride=tile.stride(0),
            cols=cols,
            max_ptr=running_max.contiguous(),
            sum_ptr=running_sum.contiguous(),
            new_max_ptr=new_max,
            new_sum_ptr=new_sum,
            rescale_ptr=rescale,
            logit_sum_ptr=logit_sum,
            weighted_ptr=weighted,
            sq_ptr=sq,
            new_weighted_ptr=new_weighted,
            new_sq_ptr=new_sq,
            top_ptr=top,
            BLOCK=block,
            STATISTICS=statistics is not None,
            num_warps=warps,
        )
    return new_max, new_sum, rescale, logit_sum, new_weighted, new_sq, top


def softmax_grad_tile(
    tile: torch.Tensor, labels_local: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor
):
    _check_tile(tile)
    rows, cols = tile.shape
    if rows:
        block, warps = launch_config(cols)
        _softmax_grad_tile_kernel[(rows,)](
            tile_ptr=tile,
            stride=tile.stride(0),
            cols=cols,
            labels_ptr=labels_local.contiguous(),
            lse_ptr=lse.contiguous(),
            grad_ptr=grad_rows.contiguous(),
            BLOCK=block,
            num_warps=warps,
        )
