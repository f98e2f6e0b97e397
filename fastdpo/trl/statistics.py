"""Per-token statistics of the LM head's next-token distribution that TRL's metrics and losses
read besides the log-probabilities, for the counted rows only and without gradient.

This is the stop-gap: a second, tiled float32 pass over ``hidden @ weight.T + bias``. Issue 16
item 2 moves these statistics into fastdpo's kernels, in the same pass that makes the
log-probabilities; when they land, :func:`head_statistics` is the one function to replace (its
callers in fastdpo/trl/lm_head.py ask for exactly the names TRL will read, and nothing when
TRL reads none).
"""

from __future__ import annotations

import torch

# The per-token fields of ``trl.trainer.utils.FusedCausalLMOutput`` besides ``log_probs``.
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Largest float32 logits tile (and converted-weight tile) one step of the pass holds; its
# element-wise temporaries take a few times this.
TILE_BYTES = 8 * 2**20


@torch.no_grad()
def head_statistics(
    hidden_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    names: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Statistics of ``softmax(hidden_rows @ weight.T + bias)``, one per row, in float32.

    ``hidden_rows`` ``[R, H]`` (the counted positions only), ``weight`` ``[V, H]``, ``bias``
    ``[V]`` or None, ``labels`` ``[R]`` (each row's next token). ``names`` is a subset of
    :data:`STATISTICS`; returns ``{name: [R]}``: float32 ``entropy``, ``log_sum_sq_probs``
    (``log sum_v p_v^2``), ``mean_logits`` (mean over the vocabulary), and bool ``is_top1``
    (the label is the first maximum, as ``argmax`` and TRL count it). The logits are made
    ``[rows, V]`` at a time (at most :data:`TILE_BYTES`), from float32 operands converted a
    vocabulary slice at a time, so neither the ``[R, V]`` logits nor a float32 copy of a
    lower-precision head is ever held.
    """
    unknown = set(names) - set(STATISTICS)
    if unknown:
        raise ValueError(f"names must be among {STATISTICS}, got {sorted(unknown)}")
    rows, vocab = hidden_rows.shape[0], weight.shape[0]
    out = {name: torch.empty(rows, dtype=torch.float32, device=hidden_rows.device) for name in names}
    if "is_top1" in out:
        out["is_top1"] = torch.empty(rows, dtype=torch.bool, device=hidden_rows.device)
    if not names or rows == 0:
        return out
    row_step = max(1, TILE_BYTES // (4 * vocab))
    vocab_step = vocab if weight.dtype == torch.float32 else max(1, TILE_BYTES // (4 * weight.shape[1]))
    # float32 products whatever the caller's autocast region says
    with torch.autocast(hidden_rows.device.type, enabled=False):
        for start in range(0, rows, row_step):
            part = slice(start, min(start + row_step, rows))
            z = _logits_tile(hidden_rows[part].float(), weight, bias, vocab_step)
            if "mean_logits" in out:
                out["mean_logits"][part] = z.mean(-1)
            if "is_top1" in out:
                out["is_top1"][part] = z.argmax(-1) == labels[part]
            log_p = z.sub_(torch.logsumexp(z, -1, keepdim=True))  # the logits are not needed any more
            if "entropy" in out:
                out["entropy"][part] = -(log_p.exp() * log_p).sum(-1)
            if "log_sum_sq_probs" in out:
                out["log_sum_sq_probs"][part] = torch.logsumexp(2 * log_p, -1)
    return out


def _logits_tile(hidden: torch.Tensor, weight, bias, vocab_step: int) -> torch.Tensor:
    """Float32 ``hidden @ weight.T + bias`` for one row tile, the head converted slice by slice."""
    z = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, weight.shape[0], vocab_step):
        cols = slice(start, min(start + vocab_step, weight.shape[0]))
        torch.mm(hidden, weight[cols].float().t(), out=z[:, cols])
        if bias is not None:
            z[:, cols] += bias[cols].float()
    return z
