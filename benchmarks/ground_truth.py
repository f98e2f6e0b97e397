"""Random DPO inputs and their float64 ground truth, shared by the tests and the benchmarks.

Nothing here imports fastdpo: the answer a kernel is checked against must not come from it.
``tests/helpers.py`` re-exports these under the names the tests use.

Inputs are ``N = 2 * pairs`` sequences of ``T`` positions (chosen rows first, then rejected);
labels are ``[N, T]`` int64 with about ``ignore_frac`` of them set to ``ignore_index``. With
``shift=True`` (the causal-LM convention) the logits at position ``t`` score the label at ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100


def make_labels(
    n: int,
    t: int,
    v: int,
    gen: torch.Generator,
    *,
    ignore_frac: float = 0.3,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Labels ``[n, t]`` uniform in ``[0, v)``, each ignored with probability ``ignore_frac``."""
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < ignore_frac] = ignore_index
    return labels


def make_logits(
    n: int,
    t: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    *,
    ignore_frac: float = 0.3,
    ignore_index: int = IGNORE_INDEX,
    seed: int = 0,
    scale: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits ``[n, t, v]`` (standard normal times ``scale``, then rounded to ``dtype``) and labels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=gen).mul_(scale).to(dtype)  # in place: no second copy
    return logits, make_labels(n, t, v, gen, ignore_frac=ignore_frac, ignore_index=ignore_index)


def make_linear(
    n: int,
    t: int,
    h: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    *,
    bias: bool = True,
    ignore_frac: float = 0.3,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    weight_scale: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Hidden states ``[n, t, h]``, an LM head ``[v, h]`` (times ``weight_scale``), a bias ``[v]``
    or None, and labels ``[n, t]``; floats in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen).to(dtype)
    weight = torch.randn(v, h, generator=gen).mul_(weight_scale).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    labels = make_labels(n, t, v, gen, ignore_frac=ignore_frac, ignore_index=ignore_index)
    return hidden, weight, b, labels


def float64_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, shift: bool = True
) -> torch.Tensor:
    """Per-token log-probs in float64, 0 at ignored labels: ``[N, T - 1]`` with ``shift``, else ``[N, T]``.

    The exact answer for the given (already rounded) logits; differentiable, so tests take the
    float64 gradient through it.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logps = torch.log_softmax(logits.double(), -1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # Selected away, not multiplied by 0: an ignored position may score a -inf (masked) logit.
    return torch.where(labels != ignore_index, picked, 0.0)


def float64_token_statistics(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, shift: bool = True
) -> dict[str, torch.Tensor]:
    """The fields of ``fastdpo.logps.TokenStatistics`` exactly, ``[N, T']``: float64 entropy,
    ``log sum p^2`` and mean logit of each position's ``softmax(logits)``, and bool ``is_top1``
    (the label is the first maximum); 0 / False at ignored labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    x = logits.double()
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    stats = {
        "entropy": -torch.where(p > 0, p * logp, 0.0).sum(-1),  # a masked entry (p = 0) adds 0
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
        "is_top1": x.argmax(-1) == labels,  # argmax: the first maximum
        "mean_logits": x.mean(-1),
    }
    counted = labels != ignore_index
    return {k: torch.where(counted, v, torch.zeros((), dtype=v.dtype)) for k, v in stats.items()}


def _chunked_sequence_sums(
    labels: torch.Tensor, logits_at: Callable[[int, slice], torch.Tensor], rows: int, ignore_index: int
) -> torch.Tensor:
    """Per-sequence sums of :func:`float64_token_logps`, ``rows`` shifted positions at a time, so
    that a float64 copy of the logits never has to fit in memory. ``logits_at(n, span)`` gives
    the logits that score ``labels[n, 1:][span]``."""
    target = labels[:, 1:]
    out = torch.zeros(labels.shape[0], dtype=torch.float64)
    for n in range(labels.shape[0]):
        for t0 in range(0, target.shape[1], rows):
            span = slice(t0, t0 + rows)
            x, y = logits_at(n, span).unsqueeze(0), target[n : n + 1, span]
            out[n] += float64_token_logps(x, y, ignore_index=ignore_index, shift=False).sum()
    return out


@torch.no_grad()
def float64_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, rows: int = 64, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-sequence log-probs ``[N]`` in float64 from logits ``[N, T, V]`` (shifted), at any vocabulary."""
    return _chunked_sequence_sums(labels, lambda n, span: logits[n, :-1][span], rows, ignore_index)


@torch.no_grad()
def float64_linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    rows: int = 128,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-sequence log-probs ``[N]`` in float64 of ``hidden @ weight.T + bias`` (shifted), the
    logits built in float64 a few positions at a time."""
    w = weight.double()
    b = bias.double() if bias is not None else 0

    def logits_at(n: int, span: slice) -> torch.Tensor:
        return hidden[n, :-1][span].double() @ w.T + b

    return _chunked_sequence_sums(labels, logits_at, rows, ignore_index)
