"""The DPO loss from hidden states without recomputing the logits, when memory allows (issue 15).

The fused linear path (fastdpo/linear.py) keeps no logits: four GEMMs per counted row, two in
the forward (logits, and the hidden-state gradient) and two in the backward (logits again, and
the head's gradient). When :class:`fastdpo.FusedLinearDPOLoss` runs on the ``native`` backend
with a loss that is a sum of per-pair terms, this module takes chunks of pairs instead
(csrc/fused_linear_chunk.cpp): the logits of the rows ``memory_budget_mib`` can hold are made
once and kept (``exp(x - m)`` per row and vocabulary entry: float32, or float16 with bfloat16
operands), the other rows take the recompute path's forward; the chunk's log-probs give the
loss of its pairs and, by autograd on that small loss, each row's upstream gradient ``g``; then
``G = g (onehot - softmax)`` and the gradients of the hidden states, head and bias follow right
away: three GEMMs for a kept row, four for the others (Liger's chunked loss works per chunk in
the same way, keeping every row). The backward only scales them by the loss's upstream
gradient. :func:`plan_chunks` decides: chunks of whole pairs each kept entirely when they fit,
else one chunk keeping as many row tiles as fit.

The reference log-probs are computed first (they enter each pair's loss). Losses that need the
whole batch - ``aot``, ``aot_pair``, ``aot_unpaired`` (sorted across the batch) and ``sft``
(normalised by the batch's token count) - take the recompute path, and so does a budget in
which not even one row tile fits. So do the options that read per-token outputs the chunk
kernel does not make: ``use_weighting`` (WPO, which needs ``log sum p^2`` per token),
``token_metrics`` (entropy and top-1 per token) and ``ld_alpha`` (LD-DPO, which weights each
token by where it falls in its completion, so a pair's gradient is not one scale per
sequence). The plan depends on the budget and the labels only, never on the thread count. The
policy log-probs in the returned ``DPOOutput`` stay differentiable: a gradient reaching them
(besides the loss's) is computed by the recompute path in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastdpo.backends import native_linear, resolve_backend
from fastdpo.backends.common import counted_rows
from fastdpo.linear import check_linear_inputs, fused_linear_logps
from fastdpo.logps import FusedLogps

# What the kept tiles of a chunk may take, by default (memory_budget_mib=None): a quarter of
# what the float32 logits of the batch, [2B, T, V], would take. Liger's chunked loss works in
# about as much as those logits compiled and twice that eager (measured: docs/fused_linear.md),
# so the default keeps fastdpo's peak under half of Liger's; the rows past it are recomputed. A
# number of MiB sets it; 0 always recomputes.
DEFAULT_LOGITS_SHARE = 0.25


def budget_bytes(memory_budget_mib: float | None, hidden: torch.Tensor, vocab: int) -> int:
    """The byte budget of ``memory_budget_mib`` for ``[2B, T, H]`` hidden states (see above)."""
    if memory_budget_mib is None:
        return int(DEFAULT_LOGITS_SHARE * 4 * hidden.shape[0] * hidden.shape[1] * vocab)
    return int(memory_budget_mib * 2**20)


BATCH_LOSSES = frozenset({"aot", "aot_pair", "aot_unpaired", "sft"})


def chunk_pairs(
    pair_rows: list[int], row_bytes: int, budget: int, accumulator: int
) -> list[tuple[int, int]] | None:
    """Consecutive pair ranges ``[p0, p1)`` whose rows' kept tiles fit ``budget`` bytes, or
    ``None`` when even one pair does not. ``accumulator`` (a float32 head gradient, needed for a
    non-float32 head once there is more than one chunk) is charged when there is more than one."""
    if sum(pair_rows) * row_bytes <= budget:
        return [(0, len(pair_rows))]
    room = budget - accumulator
    chunks, start, rows = [], 0, 0
    for p, count in enumerate(pair_rows):
        if count * row_bytes > room:
            return None
        if (rows + count) * row_bytes > room:
            chunks.append((start, p))
            start, rows = p, 0
        rows += count
    return chunks + [(start, len(pair_rows))]


def plan_chunks(
    pair_rows: list[int], row_bytes: int, budget: int, accumulator: int, row_tile: int
) -> tuple[list[tuple[int, int]], int | None] | None:
    """``(chunks, kept)``: chunks of pairs that each fit the budget whole (``kept`` None), else
    one chunk of every pair keeping its first ``kept`` rows, as many whole row tiles as fit (the
    others are recomputed within the chunk); ``None`` when not one row tile fits (the recompute
    path)."""
    chunks = chunk_pairs(pair_rows, row_bytes, budget, accumulator)
    if chunks is not None:
        return chunks, None
    kept = budget // row_bytes // row_tile * row_tile
    return ([(0, len(pair_rows))], kept) if kept > 0 else None


def kept_dtype(plan) -> torch.dtype:
    """float16 for bfloat16 operands, float32 otherwise (csrc/fused_linear_chunk.cpp says why)."""
    return torch.float16 if plan.operand_dtype == torch.bfloat16 else torch.float32


@dataclass(frozen=True)
class _Job:
    module: object  # the FusedLinearDPOLoss: its options and loss_from_logps
    labels: torch.Tensor
    reference: torch.Tensor  # [2B] float32
    chunks: list[tuple[int, int]]
    kept: int | None  # rows of the single chunk whose tiles are kept (None: all rows of each chunk)
    plan: object  # TilePlan
    out_len: int


def _chunk_rows(n: torch.Tensor, pairs: int, p0: int, p1: int) -> torch.Tensor:
    """Indices of the counted rows (sorted by sequence) of chosen p0..p1 and rejected B+p0..B+p1."""
    bounds = torch.searchsorted(n, torch.tensor([p0, p1, pairs + p0, pairs + p1], dtype=n.dtype)).tolist()
    return torch.cat([torch.arange(bounds[0], bounds[1]), torch.arange(bounds[2], bounds[3])])


class _LossInForward(torch.autograd.Function):
    """(loss, sequence_logps, logit_sums, token_logps); every gradient is made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job: _Job):
        ctx.set_materialize_grads(False)
        ops, plan, module = torch.ops.fastdpo, job.plan, job.module
        n_all, t_all, y_all = counted_rows(job.labels, module.ignore_index, module.shift)
        n, v, pairs = hidden.shape[0], weight.shape[0], hidden.shape[0] // 2
        counts = (job.labels[:, 1:] if module.shift else job.labels).ne(module.ignore_index).sum(-1)
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        accumulate = len(job.chunks) > 1 or weight.dtype == torch.float32
        grad_weight = None
        if weight.requires_grad:
            grad_weight = torch.zeros(weight.shape) if accumulate else torch.empty_like(weight)
        grad_bias = torch.zeros(v) if bias is not None and bias.requires_grad else None
        seq, sums = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        token = torch.zeros(n, job.out_len)
        blocks = -(-v // plan.vocab_tile)
        rows_max = max(int(_chunk_rows(n_all, pairs, p0, p1).numel()) for p0, p1 in job.chunks)
        if job.kept is not None:
            rows_max = min(rows_max, job.kept)
        # reused by every chunk
        kept_buffer, max_buffer = (
            torch.empty(v * rows_max, dtype=kept_dtype(plan)),
            torch.empty(blocks * rows_max),
        )
        loss = torch.zeros((), dtype=torch.float64)
        tiles = (plan.row_tile, plan.vocab_tile, native_linear.half_operands())
        hidden_k, weight_k = (x if x.stride(-1) == 1 else x.contiguous() for x in (hidden, weight))
        for p0, p1 in job.chunks:
            idx = _chunk_rows(n_all, pairs, p0, p1)
            rn, rt, ry = n_all[idx].contiguous(), t_all[idx].contiguous(), y_all[idx].contiguous()
            k = min(rn.numel(), rows_max)
            kept, block_max = kept_buffer[: v * k].view(v, k), max_buffer[: blocks * k].view(blocks, k)
            rows = (hidden_k, weight_k, bias, rn, rt, ry)
            label_logit, lse, logit_sum, share = ops.linear_chunk_forward(
                *rows, kept, block_max, grad_hidden, *tiles
            )
            picked = label_logit - lse
            token[rn, rt] = picked
            seq.index_add_(0, rn, picked.double())
            sums.index_add_(0, rn, logit_sum.double())
            # The chunk's pairs: their loss (the module's own formula) and d loss / d sequence log-prob.
            members = torch.cat([torch.arange(p0, p1), torch.arange(pairs + p0, pairs + p1)])
            local = torch.empty(n, dtype=torch.long)
            local[members] = torch.arange(members.numel())
            with torch.enable_grad():
                pi = seq[members].float().requires_grad_(True)
                part = FusedLogps(None, pi, counts[members], sums[members].float())
                chunk_loss = module.loss_from_logps(part, job.reference[members], v).loss * (
                    (p1 - p0) / pairs
                )
                (g_seq,) = torch.autograd.grad(chunk_loss, pi)
            loss += chunk_loss.detach().double()
            g_rows = g_seq[local[rn]].contiguous()
            ops.linear_chunk_backward(
                kept, block_max, lse, share, g_rows, *rows, grad_hidden, grad_weight, grad_bias, *tiles
            )
        del kept_buffer, max_buffer
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = [grad_hidden, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype)]
        ctx.job = job
        ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(sums, token)
        return loss.float(), seq.float(), sums.float(), token

    @staticmethod
    def backward(ctx, grad_loss, grad_sequences, _grad_sums, _grad_tokens):
        if ctx.grads is None:
            raise RuntimeError(
                "backward through FusedLinearDPOLoss ran twice: its gradients were made in the forward and "
                "are scaled in place; recompute the forward instead of retain_graph=True"
            )
        grads, ctx.grads = ctx.grads, None
        wanted = ctx.needs_input_grad[:3]
        grads = [
            g.mul_(grad_loss.to(g.dtype)) if g is not None and w and grad_loss is not None else None
            for g, w in zip(grads, wanted)
        ]
        if grad_sequences is not None:  # the log-probs are used beyond the loss: recompute path
            grads = _add(grads, _sequence_grads(ctx, grad_sequences))
        return grads[0], grads[1], grads[2], None


def _sequence_grads(ctx, grad_sequences):
    hidden, weight, bias = ctx.saved_tensors
    module, wanted = ctx.job.module, ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [
            None if x is None else x.detach().requires_grad_(w)
            for x, w in zip((hidden, weight, bias), wanted)
        ]
        seq = fused_linear_logps(
            leaves[0],
            leaves[1],
            ctx.job.labels,
            bias=leaves[2],
            ignore_index=module.ignore_index,
            shift=module.shift,
            backend="native",
        ).sequence_logps
        inputs = [x for x, w in zip(leaves, wanted) if w]
        found = iter(torch.autograd.grad(seq, inputs, grad_sequences, allow_unused=True))
    return [next(found) if w else None for w in wanted]


def _add(a, b):
    return [y if x is None else x if y is None else x.add_(y) for x, y in zip(a, b)]


def loss_in_forward(module, hidden, weight, bias, labels, compute_reference, ref_logps):
    """The loss of ``FusedLinearDPOLoss.forward`` computed by chunks of pairs (see the module
    docstring), or ``None`` when the recompute path must run (not native, a batch-wide loss, a
    per-token option, no gradient wanted, or the budget too small)."""
    types = {module.loss_type} if isinstance(module.loss_type, str) else set(module.loss_type)
    needs_grad = any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if not (torch.is_grad_enabled() and needs_grad) or types & BATCH_LOSSES or module.memory_budget_mib == 0:
        return None
    if module.needs_statistics or module.ld_alpha is not None:  # per-token outputs: see the docstring
        return None
    if resolve_backend(module.backend, hidden.device).name != "native":
        return None
    check_linear_inputs(hidden, weight, bias, labels, module.ignore_index, module.shift)
    labels = labels.long()
    target = labels[:, 1:] if module.shift else labels
    per_seq = target.ne(module.ignore_index).sum(-1)
    pairs = hidden.shape[0] // 2
    plan = native_linear.plan_tiles(hidden.dtype, hidden.shape[-1])
    v = weight.shape[0]
    # a row's kept tiles and block maxima
    row_bytes = kept_dtype(plan).itemsize * v + 4 * -(-v // plan.vocab_tile)
    accumulator = 0 if weight.dtype == torch.float32 else 4 * weight.numel()
    budget = budget_bytes(module.memory_budget_mib, hidden, v)
    pair_rows = (per_seq[:pairs] + per_seq[pairs:]).tolist()
    planned = plan_chunks(pair_rows, row_bytes, budget, accumulator, plan.row_tile)
    if planned is None:
        return None
    stand_in = FusedLogps(None, torch.zeros(hidden.shape[0]), per_seq, None)
    reference = module._reference(stand_in, "ref_hidden, ref_weight, ref_bias", compute_reference, ref_logps)
    out_len = target.shape[1]
    job = _Job(module, labels, reference, *planned, plan, out_len)
    loss, seq, sums, token = _LossInForward.apply(hidden, weight, bias, job)
    out = module.loss_from_logps(FusedLogps(token, seq, per_seq, sums), reference, v)
    return replace(out, loss=loss)
