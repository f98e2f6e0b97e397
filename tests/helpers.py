"""Shared test inputs, ground truth and tolerances."""

from __future__ import annotations

import torch

# Every backend named here runs the whole parity suite; a new backend joins by adding its name.
BACKENDS = ["torch", "native", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Error allowed on a per-sequence / per-token log-prob (float32 accumulation over V and T).
LOGP_ATOL = {torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
# Gradient tolerance is the output dtype's resolution (the math is float32, the result is rounded).
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 1e-4)}


def make_inputs(n, t, v, dtype=torch.float32, *, ignore_frac=0.3, ignore_index=-100, seed=0, scale=3.0):
    """Random logits [n, t, v] and labels with about ``ignore_frac`` of positions ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, t, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[torch.rand(n, t, generator=gen) < ignore_frac] = ignore_index
    return logits, labels


def ground_truth_token_logps(logits, labels, *, ignore_index=-100, shift=True):
    """float64 per-token log-probs: the exact answer for the given (rounded) logits."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    logps = torch.log_softmax(logits.double(), -1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def ground_truth_grad(logits, labels, grad_tokens, *, ignore_index=-100, shift=True):
    """float64 gradient of sum(grad_tokens * token_logps) w.r.t. the logits."""
    x = logits.detach().double().requires_grad_(True)
    out = ground_truth_token_logps(x, labels, ignore_index=ignore_index, shift=shift)
    (out * grad_tokens.double()).sum().backward()
    return x.grad


def assert_close_verbose(actual, expected, *, atol, rtol=0.0, what=""):
    """allclose that names the worst index when it fails."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs() - rtol * expected.abs()
    if actual.shape != expected.shape or err.max() > atol:
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: max error {err.max().item():.3g} > atol {atol} at {worst}: "
            f"actual {actual[worst].item()!r} expected {expected[worst].item()!r}"
        )
