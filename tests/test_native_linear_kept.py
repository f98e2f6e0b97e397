"""What the chunk path keeps (csrc/fused_linear_chunk.cpp): with bfloat16 operands exp(x - m) is
kept in float16 and the entries of G over |g| / 256 are remade exactly, so every entry of the
head's gradient tile errs by at most (2^-17 + 2^-19) |g| before the GEMM, as on the recompute
path. Checked on the ops themselves, with a float32 gradient accumulator (nothing rounded at
the end), against float64; on a machine without bfloat16 instructions the kept tiles are
float32 and the same bound holds with room to spare."""

import pytest
import torch

from fastdpo.backends import native_linear
from fastdpo.backends.common import counted_rows
from fastdpo.linear_dpo import kept_dtype


def _peaked(n=2, t=12, h=64, v=2053, seed=0):
    """bfloat16 inputs whose softmax has a few large entries and many tiny ones per row; few
    rows, so that the head's gradient is a short sum and a large entry's error shows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) * 0.6).bfloat16()
    weight[:8] *= 3  # a handful of tokens most rows put most of their mass on
    bias = torch.randn(v, generator=g).bfloat16()
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :5] = -100
    return hidden, weight, bias, labels


def _chunk_grads(hidden, weight, bias, labels, grad_rows, kept_rows, tiles):
    """(grad_weight float32, grad_bias, grad_hidden) of one chunk through the two ops."""
    ops = torch.ops.fastdpo
    native_linear._register()
    rn, rt, ry = (x.contiguous() for x in counted_rows(labels, -100, True))
    plan = native_linear.plan_tiles(hidden.dtype, hidden.shape[-1], *tiles)
    v, blocks = weight.shape[0], -(-weight.shape[0] // plan.vocab_tile)
    kept = torch.empty(v, kept_rows, dtype=kept_dtype(plan))
    block_max = torch.empty(blocks, kept_rows)
    grad_hidden = torch.zeros_like(hidden)
    half = native_linear.half_operands()
    args = (hidden, weight, bias, rn, rt, ry)
    _, lse, _, share = ops.linear_chunk_forward(
        *args, kept, block_max, grad_hidden, plan.row_tile, plan.vocab_tile, half
    )
    grad_weight, grad_bias = torch.zeros(weight.shape), torch.zeros(v)
    ops.linear_chunk_backward(
        kept, block_max, lse, share, grad_rows, *args, grad_hidden, grad_weight, grad_bias,
        plan.row_tile, plan.vocab_tile, half,
    )  # fmt: skip
    return grad_weight, grad_bias, grad_hidden, (rn, rt, ry)


@pytest.mark.parametrize("kept_rows", ["all", "some"])
def test_head_gradient_within_the_bound(kept_rows):
    hidden, weight, bias, labels = _peaked()
    rows = counted_rows(labels, -100, True)
    c = rows[0].numel()
    g = torch.Generator().manual_seed(1)
    grad_rows = torch.randn(c, generator=g)
    k = c if kept_rows == "all" else 8
    grad_weight, grad_bias, grad_hidden, _ = _chunk_grads(
        hidden, weight, bias, labels, grad_rows, k, (4, 128)
    )

    h64 = hidden.double()[rows[0], rows[1]]
    x = h64 @ weight.double().T + bias.double()
    p = torch.softmax(x, -1)
    onehot = torch.nn.functional.one_hot(rows[2], weight.shape[0]).double()
    G = grad_rows.double()[:, None] * (onehot - p)
    assert (p > 1 / 256).sum() > c and (p < 1 / 256).float().mean() > 0.9  # both kinds of entries
    want_w, want_b = G.T @ h64, G.sum(0)
    # Per entry of G at most (2^-17 + 2^-19 + 2^-25) |g|, plus float32 sums of the GEMM.
    per_entry = (2**-17 + 2**-19 + 2**-25) * grad_rows.double().abs()
    bound_w = per_entry @ h64.abs() + 1e-6 * (G.abs().T @ h64.abs())
    err_w = (grad_weight.double() - want_w).abs()
    assert (err_w <= bound_w).all(), f"max excess {(err_w - bound_w).max():.3g}"
    bound_b = per_entry.sum() + 1e-6 * G.abs().sum(0)
    assert ((grad_bias.double() - want_b).abs() <= bound_b).all()
    # The hidden states' gradient (bfloat16, one row's sum): within the rounding of its own value.
    want_h = G @ weight.double()
    got_h = grad_hidden[rows[0], rows[1]].double()
    scale = want_h.abs().max(-1, keepdim=True).values
    assert ((got_h - want_h).abs() <= 2**-7 * scale).all()


@pytest.mark.parametrize("row_tile", [32, 16])
@pytest.mark.parametrize("kept_rows", ["all", "none"])
def test_each_row_is_checked_against_its_own_limit(kept_rows, row_tile):
    """A 32-row tile holding 24 rows spans two float32 vectors, and 16-row tiles make two tiles:
    the entries corrected to float32 are chosen by each row's own |g| / 256. The first 16 rows
    get a huge |g| but zero hidden states (they add nothing to the head's gradient, nor to the
    bound), so a row of the second vector or tile compared against the first one's limits would
    lose its corrections and break the bound. Kept tiles and recomputed ones (none kept) share
    the correction."""
    hidden, weight, bias, labels = _peaked(n=4)
    rows = counted_rows(labels, -100, True)
    c = rows[0].numel()
    assert 16 < c <= 32
    hidden[rows[0][:16], rows[1][:16]] = 0
    grad_rows = torch.ones(c)
    grad_rows[:16] = 1000.0
    k = c if kept_rows == "all" else 0
    grad_weight, _, _, _ = _chunk_grads(hidden, weight, bias, labels, grad_rows, k, (row_tile, 128))
    h64 = hidden.double()[rows[0], rows[1]]
    p = torch.softmax(h64 @ weight.double().T + bias.double(), -1)
    onehot = torch.nn.functional.one_hot(rows[2], weight.shape[0]).double()
    G = grad_rows.double()[:, None] * (onehot - p)
    per_entry = (2**-17 + 2**-19 + 2**-25) * grad_rows.double().abs()
    bound = per_entry @ h64.abs() + 1e-6 * (G.abs().T @ h64.abs())
    err = (grad_weight.double() - G.T @ h64).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


def test_kept_buffers_are_checked():
    """The ops name the buffer at fault: the kept tiles' dtype for these operands, and a kept row
    count that is neither every row nor whole row tiles."""
    hidden, weight, bias, labels = _peaked()
    native_linear._register()
    rn, rt, ry = (x.contiguous() for x in counted_rows(labels, -100, True))
    plan = native_linear.plan_tiles(hidden.dtype, hidden.shape[-1], 4, 128)
    v, blocks, c = weight.shape[0], -(-weight.shape[0] // 128), rn.numel()
    args = (hidden, weight, bias, rn, rt, ry)
    tiles = (4, 128, native_linear.half_operands())
    wrong = torch.float32 if kept_dtype(plan) == torch.float16 else torch.float16
    with pytest.raises(RuntimeError, match="kept must be"):
        torch.ops.fastdpo.linear_chunk_forward(
            *args, torch.empty(v, c, dtype=wrong), torch.empty(blocks, c), torch.zeros_like(hidden), *tiles
        )
    with pytest.raises(RuntimeError, match="multiple of row_tile"):
        torch.ops.fastdpo.linear_chunk_forward(
            *args,
            torch.empty(v, 3, dtype=kept_dtype(plan)),
            torch.empty(blocks, 3),
            torch.zeros_like(hidden),
            *tiles,
        )
