"""Triton tile kernels of the fused linear path (contract in fastdpo/backends/__init__.py).

The fused linear path (fastdpo/backends/linear_tiles.py) computes a float32 tile ``[rows, vocabulary
block]`` of the projection with a matmul, then calls these kernels for the element-wise work:
one program per tile row, the row streamed in ``BLOCK`` pieces, all math in float32.

- ``lse_fold``: sweep 1 reads the row for its max and logit sum; sweep 2 reads it again (from
  L2: a row is at most a few tens of KB) and writes ``exp(x - new_max)`` over it.
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
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + r * stride
    m_tile = -float("inf")
    total = 0.0
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < cols, other=-float("inf"))
        m_tile = tl.maximum(m_tile, tl.max(x, axis=0))
        total += tl.sum(tl.where(offs < cols, x, 0.0), axis=0)
    m_old = tl.load(max_ptr + r)
    m = tl.maximum(m_old, m_tile)
    # Subtract 0 while the row is all -inf (running max -inf, running sum empty): the rescale and
    # the tile's terms are then exp(-inf) = 0, never exp(-inf - -inf) = NaN.
    offset = tl.where(m == -float("inf"), 0.0, m)
    rescale = tl.exp(m_old - offset)
    exp_sum = 0.0
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < cols
        e = tl.exp(tl.load(row_ptr + offs, mask=in_row, other=-float("inf")) - offset)
        tl.store(row_ptr + offs, e, mask=in_row)
        exp_sum += tl.sum(e, axis=0)
    tl.store(new_max_ptr + r, m)
    tl.store(new_sum_ptr + r, tl.load(sum_ptr + r) * rescale + exp_sum)
    tl.store(rescale_ptr + r, rescale)
    tl.store(logit_sum_ptr + r, total)


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
    _check_tile(tile)
    rows, cols = tile.shape
    new_max, new_sum, rescale, logit_sum = (torch.empty_like(running_max) for _ in range(4))
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
            BLOCK=block,
            num_warps=warps,
        )
    return new_max, new_sum, rescale, logit_sum


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
