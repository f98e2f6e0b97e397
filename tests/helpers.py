"""Shared test inputs, ground truth and tolerances.

The random inputs and the float64 ground truth live in ``benchmarks/ground_truth.py`` (no fastdpo
import), which the benchmarks use too; the tests know them by the names below.
"""

from __future__ import annotations

import torch

from benchmarks.ground_truth import float64_token_logps as ground_truth_token_logps
from benchmarks.ground_truth import make_linear
from benchmarks.ground_truth import make_logits as make_inputs

__all__ = ["ground_truth_token_logps", "make_inputs", "make_linear"]

# Every backend named here runs the whole parity suite; a new backend joins by adding its name.
BACKENDS = ["torch", "native", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Error allowed on a per-sequence / per-token log-prob (float32 accumulation over V and T).
LOGP_ATOL = {torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
# Gradient tolerance is the output dtype's resolution (the math is float32, the result is rounded).
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}


def ground_truth_grad(logits, labels, grad_tokens, *, ignore_index=-100, shift=True):
    """float64 gradient of sum(grad_tokens * token_logps) w.r.t. the logits."""
    x = logits.detach().double().requires_grad_(True)
    out = ground_truth_token_logps(x, labels, ignore_index=ignore_index, shift=shift)
    (out * grad_tokens.double()).sum().backward()
    return x.grad


def assert_close_verbose(actual, expected, *, atol, rtol=0.0, what=""):
    """allclose that names the worst index when it fails. Equal infinities and NaN where NaN is
    expected match; any other NaN or infinity is an error (``err.max() > atol`` alone is False
    for NaN, so a NaN output would pass)."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    err = torch.where(same, 0.0, (actual - expected).abs() - rtol * expected.abs())
    err = torch.where(err.isnan(), torch.inf, err)
    if err.numel() and err.max() > atol:
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: max error {err.max().item():.3g} > atol {atol} at {worst}: "
            f"actual {actual[worst].item()!r} expected {expected[worst].item()!r}"
        )


# Bias -inf over whole vocabulary tiles of 8 (a masked vocabulary; V = 37 is [0, 8) [8, 16)
# [16, 24) [24, 32) [32, 37)): each tile fold's running max stays -inf until the first allowed tile.
BIAS_MASKS = {
    "leading": slice(0, 12),
    "trailing": slice(20, 37),
    "interior": slice(8, 24),
    "all-but-one": [i for i in range(37) if i != 29],
}


def make_masked_linear(dtype, mask: str):
    """``make_linear(4, 9, 16, 37, dtype)`` with ``BIAS_MASKS[mask]`` masked by a -inf bias and
    every counted label on an allowed entry (a finite answer); also returns the counted mask."""
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37, dtype)
    allowed = torch.ones(37, dtype=torch.bool)
    allowed[BIAS_MASKS[mask]] = False
    bias[~allowed] = -torch.inf
    choices = allowed.nonzero().squeeze(1)
    counted = labels != -100
    pick = torch.randint(len(choices), (int(counted.sum()),), generator=torch.Generator().manual_seed(2))
    labels[counted] = choices[pick]
    return hidden, weight, bias, labels, counted
