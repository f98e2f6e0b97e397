"""The methods the benchmarks compare, each as ``make(name) -> fn(logits, labels) -> [N] log-probs``.

Shared by the pytest-benchmark suites and the fresh-subprocess memory probe, so both time and
measure exactly the same code.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

import fastdpo
from fastdpo.naive import naive_sequence_logps

IGNORE_FRACTION = 0.3
# (pairs, T, V) from the core issue; N = 2 * pairs rows.
SHAPES = {"llama2-32k": (4, 512, 32000), "llama3-128k": (2, 512, 128256)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_inputs(shape: tuple[int, int, int], dtype: str, seed: int = 0):
    """Random logits ``[2 * pairs, T, V]`` (scale 2) and labels with ~30% ignored."""
    pairs, t, v = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * pairs, t, v, generator=gen).mul_(2.0).to(DTYPES[dtype])
    labels = torch.randint(0, v, (2 * pairs, t), generator=gen)
    labels[torch.rand(2 * pairs, t, generator=gen) < IGNORE_FRACTION] = -100
    return logits, labels


def _trl_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` on the shifted slice, masked and summed, as TRL's trainer does."""
    from trl.trainer.utils import selective_log_softmax

    target = labels[:, 1:]
    mask = target != -100
    per_token = selective_log_softmax(logits[:, :-1], target.masked_fill(~mask, 0))
    return (per_token * mask).sum(-1)


_compiled_reference = None


def _compiled(logits, labels):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(naive_sequence_logps, dynamic=False)
    return _compiled_reference(logits, labels)


def _native_inplace(logits, labels):
    """The native kernel with the opt-in in-place backward: the gradient overwrites the logits.

    In a model the logits are an intermediate (the LM head's output) and the in-place gradient
    flows on to the head's backward. Here they are a leaf, and autograd would clone a gradient
    that aliases the leaf itself; passing them through a view keeps the benchmark honest.
    """
    x = logits.view_as(logits) if logits.requires_grad else logits
    return fastdpo.fused_logps(x, labels, backend="native", inplace_backward=True).sequence_logps


def _read_floor(logits, labels):
    """One read pass over the logits (``amax``): the memory-bandwidth floor for the forward."""
    return logits.amax(-1).sum(-1)


# Methods that only make sense without autograd (not part of the forward+backward comparisons).
FORWARD_ONLY = {"read-floor-amax"}


def available_methods() -> dict[str, Callable]:
    """Every method this machine can run: fastdpo backends first, then the baselines."""
    methods = {}
    for backend in fastdpo.available_backends("cpu"):
        methods[f"fastdpo-{backend}"] = lambda x, y, b=backend: fastdpo.sequence_logps(x, y, backend=b)
    if "fastdpo-native" in methods:
        methods["fastdpo-native-inplace"] = _native_inplace
    methods["reference"] = naive_sequence_logps
    methods["reference-compiled"] = _compiled
    if importlib.util.find_spec("trl") is not None:
        methods["trl-selective-log-softmax"] = _trl_sequence_logps
    methods["read-floor-amax"] = _read_floor
    return methods


def missing_methods() -> list[str]:
    return (
        []
        if importlib.util.find_spec("trl") is not None
        else ["trl-selective-log-softmax (trl not installed)"]
    )


def run_once(fn: Callable, logits: torch.Tensor, labels: torch.Tensor, mode: str) -> None:
    """One call in ``mode``: ``forward`` (no autograd) or ``forward_backward``.

    In-place methods overwrite ``logits`` with the gradient, so later calls see other values;
    the work done, and so the time, does not depend on them.
    """
    if mode == "forward":
        with torch.no_grad():
            fn(logits, labels)
        return
    logits.requires_grad_(True)
    fn(logits, labels).sum().backward()
    logits.grad = None
    logits.requires_grad_(False)


def float64_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """Ground truth in float64, a few rows at a time so it fits in memory at any vocabulary."""
    target = labels[:, 1:]
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for n in range(logits.shape[0]):
        for t0 in range(0, target.shape[1], rows):
            x = logits[n, t0 : t0 + rows].double()
            y = target[n, t0 : t0 + rows]
            keep = y != -100
            lp = torch.log_softmax(x, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[n] += (lp * keep).sum()
    return out


def max_abs_error(fn: Callable, logits: torch.Tensor, labels: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest per-sequence error of ``fn`` against the float64 ground truth."""
    with torch.no_grad():
        return (fn(logits, labels).double() - exact).abs().max().item()
