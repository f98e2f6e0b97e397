"""Pure-PyTorch backend: runs anywhere, never materialises a full-size copy of the logits.

Only the rows whose label is counted are gathered, a chunk at a time, upcast to float32 in a
buffer of at most ``CHUNK_BYTES``; the shift is applied to the row indices, never by slicing
and copying the logits.
"""

from __future__ import annotations

import torch

from fastdpo.backends.common import Backend, counted_rows, out_len

# Size of the float32 working buffer per chunk: large enough to amortise the per-chunk
# overhead, small next to any logits tensor worth optimising (a 128k vocabulary row is 0.5 MB).
CHUNK_BYTES = 4 * 2**20


def _chunks(num_rows: int, vocab: int):
    step = max(1, CHUNK_BYTES // (4 * vocab))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    return _forward(logits, labels, ignore_index, shift, statistics=False)


def forward_statistics(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    return _forward(logits, labels, ignore_index, shift, statistics=True)


def _forward(logits, labels, ignore_index: int, shift: bool, statistics: bool):
    n, t, vocab = logits.shape
    out_t = out_len(t, shift)
    device = logits.device
    token_logps = torch.zeros(n, out_t, dtype=torch.float32, device=device)
    lse = torch.zeros(n, out_t, dtype=torch.float32, device=device)
    # Per-sequence sums add hundreds of terms chunk by chunk: accumulate them in float64 so the
    # order of addition does not cost accuracy (a few bytes per sequence).
    sequence_logps = torch.zeros(n, dtype=torch.float64, device=device)
    logit_sums = torch.zeros(n, dtype=torch.float64, device=device)
    stats = _empty_statistics(n, out_t, device) if statistics else None
    n_idx, t_idx, target = counted_rows(labels, ignore_index, shift)
    for part in _chunks(n_idx.numel(), vocab):
        rows_n, rows_t, lab = n_idx[part], t_idx[part], target[part]
        x = logits[rows_n, rows_t].float()  # [rows, V], a fresh copy: the only working buffer
        row_sum = x.sum(dim=-1)  # a row: float32 pairwise sum
        logit_sums.index_add_(0, rows_n, row_sum.double())
        label_logit = x.gather(1, lab.unsqueeze(1)).squeeze(1)
        row_max = x.amax(dim=-1)
        if stats is not None:  # before x is overwritten: the label against the first maximum
            stats["is_top1"][rows_n, rows_t] = x.argmax(dim=-1) == lab
            stats["mean_logits"][rows_n, rows_t] = row_sum / vocab
        # A row that is all -inf (masked) subtracts 0, not -inf (which would give NaN).
        offset = torch.where(row_max == -torch.inf, 0.0, row_max).unsqueeze(1)
        shifted = x.sub_(offset)
        if stats is not None:
            _fold_statistics(stats, shifted, rows_n, rows_t)
        row_lse = shifted.exp_().sum(dim=-1).log_().add_(row_max)
        picked = label_logit - row_lse
        token_logps[rows_n, rows_t] = picked
        lse[rows_n, rows_t] = row_lse
        sequence_logps.index_add_(0, rows_n, picked.double())
    sequence_logps, logit_sums = sequence_logps.float(), logit_sums.float()
    if stats is None:
        return token_logps, lse, sequence_logps, logit_sums
    return token_logps, lse, sequence_logps, logit_sums, *stats.values()


def _empty_statistics(n: int, out_t: int, device) -> dict[str, torch.Tensor]:
    """The ``[N, T']`` outputs of ``forward_statistics``, in its order; zeros where ignored."""
    f32 = dict(dtype=torch.float32, device=device)
    return {
        "entropy": torch.zeros(n, out_t, **f32),
        "log_sum_sq_probs": torch.zeros(n, out_t, **f32),
        "is_top1": torch.zeros(n, out_t, dtype=torch.bool, device=device),
        "mean_logits": torch.zeros(n, out_t, **f32),
    }


def _fold_statistics(stats, shifted: torch.Tensor, rows_n, rows_t) -> None:
    """Entropy and ``log sum p^2`` of rows given as ``x - max(x)``, without a log-softmax copy:
    with ``e = exp(x - m)`` and ``s = sum e``, entropy ``= log s - sum(e (x - m)) / s`` and
    ``log sum p^2 = log sum e^2 - 2 log s``. A masked entry (``e = 0``, ``x - m = -inf``) adds 0."""
    e = shifted.exp()
    s = e.sum(dim=-1)
    weighted = torch.where(e > 0, e * shifted, 0.0).sum(dim=-1)
    log_s = s.log()
    stats["entropy"][rows_n, rows_t] = log_s - weighted / s
    stats["log_sum_sq_probs"][rows_n, rows_t] = e.square_().sum(dim=-1).log_() - 2 * log_s


def backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    ignore_index: int,
    shift: bool,
    inplace: bool = False,
):
    vocab = logits.shape[-1]
    n_idx, t_idx, target = counted_rows(labels, ignore_index, shift)
    # Counted rows are written chunk by chunk (in place: after being read); the rest become zeros,
    # so the gradient is written once, not zero-filled first.
    keep = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    keep[n_idx, t_idx] = True
    if inplace:
        grad = logits
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for part in _chunks(n_idx.numel(), vocab):
        rows_n, rows_t, lab = n_idx[part], t_idx[part], target[part]
        g = grad_rows[rows_n, rows_t]
        x = logits[rows_n, rows_t].float()
        # g * (onehot - softmax), computed in place in the float32 buffer
        x.sub_(lse[rows_n, rows_t].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
        x[torch.arange(lab.numel(), device=x.device), lab] += g
        grad[rows_n, rows_t] = x.to(grad.dtype)
    grad[(~keep).nonzero(as_tuple=True)] = 0  # index pairs: ~8x faster than a boolean mask here
    return grad


def lse_fold(tile: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor):
    """The fused linear path's tile fold (contract in fastdpo/backends/__init__.py), in torch ops."""
    logit_sum = tile.sum(dim=1)
    new_max = torch.maximum(running_max, tile.amax(dim=1))
    # Subtract 0 from a row that is all -inf so far (a masked vocabulary block): its rescale and
    # its terms are then exp(-inf) = 0, where subtracting -inf would give exp(-inf - -inf) = NaN.
    offset = torch.where(new_max == -torch.inf, 0.0, new_max)
    rescale = torch.exp(running_max - offset)
    tile.sub_(offset.unsqueeze(1)).exp_()
    return new_max, running_sum * rescale + tile.sum(dim=1), rescale, logit_sum


def stats_fold(
    tile: torch.Tensor,
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    running_weighted: torch.Tensor,
    running_sq: torch.Tensor,
):
    """``lse_fold`` (the same arithmetic, so the same bits) plus the statistics' running sums and
    the tile's first maximum (contract in fastdpo/backends/__init__.py)."""
    tile_max, top = tile.max(dim=1)  # the first maximum, as argmax; the max is amax's, exactly
    logit_sum = tile.sum(dim=1)
    new_max = torch.maximum(running_max, tile_max)
    offset = torch.where(new_max == -torch.inf, 0.0, new_max)
    rescale = torch.exp(running_max - offset)
    centred = tile - offset.unsqueeze(1)
    torch.exp(centred, out=tile)  # tile := exp(x - max), as lse_fold leaves it
    # A masked entry (e = 0, centred -inf) must add 0, not 0 * -inf = NaN: made finite first.
    centred.clamp_(min=torch.finfo(torch.float32).min)
    weighted = torch.linalg.vecdot(tile, centred)  # per row: sum e (x - max)
    sq = torch.linalg.vecdot(tile, tile)
    # The old sums are relative to the old max: moved to the new one they gain (old - new) per
    # unit of sum, 0 while the sum is empty (old max -inf; never -inf * 0).
    w_shift = torch.where(running_max == -torch.inf, 0.0, running_max - offset) * running_sum
    new_weighted = rescale * (running_weighted + w_shift) + weighted
    new_sq = rescale * rescale * running_sq + sq
    return new_max, running_sum * rescale + tile.sum(dim=1), rescale, logit_sum, new_weighted, new_sq, top


def softmax_grad_tile(
    tile: torch.Tensor, labels_local: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor
):
    """``tile := grad_rows * (onehot(labels_local) - exp(tile - lse))``, in torch ops."""
    tile.sub_(lse.unsqueeze(1)).exp_().mul_(-grad_rows.unsqueeze(1))
    here = ((labels_local >= 0) & (labels_local < tile.shape[1])).nonzero().squeeze(1)
    tile[here, labels_local[here]] += grad_rows[here]


def load() -> Backend:
    return Backend(
        "torch",
        forward,
        backward,
        lse_fold,
        softmax_grad_tile,
        supports=lambda device: True,
        forward_statistics=forward_statistics,
        stats_fold=stats_fold,
    )
