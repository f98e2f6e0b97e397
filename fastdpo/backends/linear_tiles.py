"""The fused linear path's tiled loops: labelled-token log-probs from hidden states and an LM
head, with the ``[N, T, V]`` logits never in memory.

Only counted rows (label != ignore_index) are projected. A tile is ``[row_tile, vocab_tile]``
float32 logits, made by one matmul and handed to the backend's tile kernels (contract in
fastdpo/backends/__init__.py) for the element-wise work.

Work per counted row, with ``H`` the hidden size and ``V`` the vocabulary (4 matmuls, the
minimum without keeping logits: the log-sum-exp must be known before any gradient can be):

- forward, row tiles outer, vocabulary tiles inner: ``x = h W^T + b`` (matmul 1) folded into
  an online log-sum-exp. When the hidden states need a gradient, the same sweep also
  accumulates ``sum_v exp(x_v - max) W_v`` (matmul 2), rescaled as the max grows, so that at
  the end of the row ``d logp / d h = W[label] - softmax(x) W`` is known exactly. It is written
  straight into the hidden-state gradient buffer; the backward only scales each row by its
  upstream gradient. No float32 ``[rows, H]`` accumulator has to live until the backward.
- backward, vocabulary tiles outer, row tiles inner: recompute ``x`` (matmul 3), turn it into
  ``g * (onehot - softmax)`` in place, accumulate ``grad_W[tile] += x^T h`` (matmul 4). Each
  vocabulary tile's weight gradient is complete when its row loop ends, so it is written once
  in the weight's dtype: no float32 ``[V, H]`` buffer even for a bfloat16 head.

On CPU the matmul operands are float32 tiles converted on the fly: a bfloat16 matmul is many
times slower than a float32 one on CPUs without native bf16 instructions, and float32 is exact
to the last bit that matters here. On CUDA the operands keep their dtype and the products
accumulate in float32 (``out_dtype``), as tensor cores want.

The matmuls are the only part whose result depends on the number of threads (MKL partitions a
product's rows by thread count): docs/fused_linear.md, "Thread count and bitwise
reproducibility".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastdpo.backends.common import Backend

# CPU tile shapes (rows, vocabulary), largest first. Bigger tiles keep two threads' matmuls
# busier (measured on 2 cores: 512 x 1024 about 10-30% faster than 256 x 512), smaller ones hold
# less; the plan takes the largest whose working set stays within TILE_BUDGET of the logits.
CPU_TILES = ((512, 1024), (512, 512), (256, 512))
TILE_BUDGET = 0.035  # of what the logits would take: the fused path promises under 5% in all
# CUDA tiles: bigger, for tensor-core efficiency (untimed: this project has no GPU).
CUDA_ROW_TILE = 1024
CUDA_VOCAB_TILE = 4096


@dataclass(frozen=True)
class TilePlan:
    row_tile: int
    vocab_tile: int
    operand_dtype: torch.dtype  # dtype of the matmul operands; products are always float32


def working_bytes(rows: int, cols: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Float32 buffers one tile step holds at once (the larger of forward and backward): row
    tile and accumulator (forward), the logits tile, and when the inputs are not float32 the
    converted head tile and its gradient accumulator (backward)."""
    converted = 0 if dtype == torch.float32 else 2 * cols * hidden_size
    forward = 3 * rows * hidden_size + rows * cols + converted // 2
    backward = rows * hidden_size + rows * cols + converted
    return 4 * max(forward, backward)


def plan_tiles(
    device: torch.device,
    dtype: torch.dtype,
    hidden_size: int,
    logits_bytes: int,
    row_tile: int | None = None,
    vocab_tile: int | None = None,
) -> TilePlan:
    """Tile shape and matmul operand dtype; ``logits_bytes`` is what the logits would take."""
    if device.type == "cuda":
        return TilePlan(row_tile or CUDA_ROW_TILE, vocab_tile or CUDA_VOCAB_TILE, dtype)
    fits = [t for t in CPU_TILES if working_bytes(*t, hidden_size, dtype) <= TILE_BUDGET * logits_bytes]
    rows, cols = fits[0] if fits else CPU_TILES[-1]
    return TilePlan(row_tile or rows, vocab_tile or cols, torch.float32)


class Rows(NamedTuple):
    """The counted positions: sequence ``n``, position ``t`` of the hidden row, and its label."""

    n: torch.Tensor
    t: torch.Tensor
    label: torch.Tensor

    def tile(self, start: int, stop: int) -> Rows:
        return Rows(self.n[start:stop], self.t[start:stop], self.label[start:stop])


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32, accumulated in float32 whatever the operands' dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    return torch.mm(a, b, out_dtype=torch.float32)  # CUDA half operands


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc.add_(_matmul_f32(a, b))


def _project(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One float32 logits tile ``h @ w^T + bias``."""
    x = _matmul_f32(h, w.t())
    return x.add_(bias) if bias is not None else x


def _vocab_tiles(vocab: int, plan: TilePlan):
    for start in range(0, vocab, plan.vocab_tile):
        yield start, min(start + plan.vocab_tile, vocab)


def _row_tiles(rows: Rows, plan: TilePlan):
    count = rows.n.numel()
    for start in range(0, count, plan.row_tile):
        yield start, min(start + plan.row_tile, count)


def forward_tiles(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: Rows,
    kernels: Backend,
    plan: TilePlan,
    hidden_grad: torch.Tensor | None = None,
    statistics: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per counted row: ``(label_logit, lse, logit_sum)``, float32 ``[C]``.

    With ``hidden_grad`` (``hidden``'s shape and dtype, zeros), each counted row of it receives
    ``d log_softmax(x)[label] / d h = W[label] - softmax(x) W``.

    With ``statistics=True`` (the backend's ``stats_fold`` in place of ``lse_fold``: the same
    first three outputs and gradient, bitwise) also ``(entropy, log_sum_sq_probs, is_top1)``
    per counted row (float32, float32, bool) of ``softmax(x)``; see :class:`_RunningStatistics`.
    """
    f32 = dict(dtype=torch.float32, device=hidden.device)
    count = rows.n.numel()
    label_logit, lse, logit_sum = (torch.empty(count, **f32) for _ in range(3))
    stats = None
    if statistics:
        stats = (
            torch.empty(count, **f32),
            torch.empty(count, **f32),
            torch.empty(count, dtype=torch.bool, device=hidden.device),
        )
    bias32 = None if bias is None else bias.float()
    for r0, r1 in _row_tiles(rows, plan):
        part = rows.tile(r0, r1)
        h = hidden[part.n, part.t].to(plan.operand_dtype)  # [r, H]
        run_max = torch.full((r1 - r0,), -torch.inf, **f32)
        run_sum = torch.zeros(r1 - r0, **f32)
        row_logits = torch.zeros(r1 - r0, **f32)
        picked = torch.zeros(r1 - r0, **f32)
        acc = None if hidden_grad is None else torch.zeros(r1 - r0, hidden.shape[-1], **f32)
        running = None if stats is None else _RunningStatistics.start(r1 - r0, hidden.device)
        for v0, v1 in _vocab_tiles(weight.shape[0], plan):
            w = weight[v0:v1].to(plan.operand_dtype)
            x = _project(h, w, None if bias32 is None else bias32[v0:v1])
            local = part.label - v0
            here = (local >= 0) & (local < v1 - v0)
            picked = torch.where(
                here, x.gather(1, local.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1), picked
            )
            if running is None:
                run_max, run_sum, rescale, tile_logits = kernels.lse_fold(
                    x, run_max, run_sum
                )  # x := exp(x - max)
            else:
                run_max, run_sum, rescale, tile_logits, running = running.fold(
                    kernels, x, run_max, run_sum, v0
                )
            row_logits += tile_logits
            if acc is not None:
                acc.mul_(rescale.unsqueeze(1))
                _accumulate(acc, x.to(plan.operand_dtype), w)
        label_logit[r0:r1], lse[r0:r1], logit_sum[r0:r1] = picked, run_max + run_sum.log(), row_logits
        if stats is not None:
            for out, value in zip(stats, running.finish(run_sum, part.label)):
                out[r0:r1] = value
        if hidden_grad is not None:
            acc.div_(run_sum.unsqueeze(1)).neg_().add_(weight[part.label])  # W[label] - softmax(x) W
            hidden_grad[part.n, part.t] = acc.to(hidden_grad.dtype)
    if stats is None:
        return label_logit, lse, logit_sum
    return label_logit, lse, logit_sum, *stats


class _RunningStatistics(NamedTuple):
    """A row tile's running sums for the token statistics, relative to its running max ``m``
    (``e = exp(x - m)``): ``weighted = sum e (x - m)``, ``sq = sum e^2`` and ``top``, the
    column of the first maximum so far (0 until a finite one appears: argmax's answer for a
    row that is all -inf)."""

    weighted: torch.Tensor
    sq: torch.Tensor
    top: torch.Tensor

    @staticmethod
    def start(count: int, device) -> _RunningStatistics:
        f32 = dict(dtype=torch.float32, device=device)
        return _RunningStatistics(
            torch.zeros(count, **f32),
            torch.zeros(count, **f32),
            torch.zeros(count, dtype=torch.long, device=device),
        )

    def fold(self, kernels: Backend, x: torch.Tensor, run_max, run_sum, v0: int):
        """``kernels.lse_fold``'s outputs for the tile ``x`` (columns from ``v0``; overwritten
        with ``exp(x - max)``) and the running statistics with the tile folded in."""
        new_max, new_sum, rescale, tile_logits, weighted, sq, tile_top = kernels.stats_fold(
            x, run_max, run_sum, self.weighted, self.sq
        )
        # Only a strictly higher max moves the first maximum: an equal one in a later tile is not.
        top = torch.where(new_max > run_max, tile_top + v0, self.top)
        return new_max, new_sum, rescale, tile_logits, _RunningStatistics(weighted, sq, top)

    def finish(self, run_sum: torch.Tensor, labels: torch.Tensor):
        """``(entropy, log_sum_sq_probs, is_top1)`` with ``s = sum e``: entropy
        ``= log s - weighted / s``, ``log sum p^2 = log sq - 2 log s``."""
        log_s = run_sum.log()
        return log_s - self.weighted / run_sum, self.sq.log() - 2 * log_s, self.top == labels


def weight_grad_tiles(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: Rows,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    kernels: Backend,
    plan: TilePlan,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_rows * logp_rows)`` w.r.t. the LM head's weight and bias, each
    vocabulary tile finished in float32 and written once in the parameter's dtype."""
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty_like(bias) if need_bias and bias is not None else None
    bias32 = None if bias is None else bias.float()
    f32 = dict(dtype=torch.float32, device=weight.device)
    in_place = weight.dtype == torch.float32
    for v0, v1 in _vocab_tiles(weight.shape[0], plan):
        w = weight[v0:v1].to(plan.operand_dtype)
        # A float32 weight's gradient accumulates in place in the output; others in a tile buffer.
        gw = None
        if grad_weight is not None:
            gw = grad_weight[v0:v1].zero_() if in_place else torch.zeros(v1 - v0, weight.shape[1], **f32)
        gb = torch.zeros(v1 - v0, **f32)
        for r0, r1 in _row_tiles(rows, plan):
            part = rows.tile(r0, r1)
            h = hidden[part.n, part.t].to(plan.operand_dtype)
            x = _project(h, w, None if bias32 is None else bias32[v0:v1])
            kernels.softmax_grad_tile(x, part.label - v0, lse[r0:r1], grad_rows[r0:r1])
            if gw is not None:
                _accumulate(gw, x.t().to(plan.operand_dtype), h)
            if grad_bias is not None:
                gb += x.sum(0)
        if gw is not None and not in_place:
            grad_weight[v0:v1] = gw
        if grad_bias is not None:
            grad_bias[v0:v1] = gb
    return grad_weight, grad_bias
