"""The one interface every benchmark suite implements, and the calls the drivers make through it.

A :class:`Suite` says how to build its inputs for a shape and dtype, which methods compute the
same result from them (each ``method(inputs) -> Output``, one signature for every method of
every suite), the float64 ground truth of that result, and how large the logits are (or would
be), which memory is measured against. The drivers (``benchmarks.probe``, ``benchmarks.report``
and ``benchmarks/test_suites.py``) reach every suite and method by name through it and have no
per-suite code. The suites themselves are in ``benchmarks/suites.py``.

Adding a method is one entry: in ``methods`` for fastdpo's own and the naive baselines, in
``peers`` for another library's (reported as not measured where that library is missing).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("forward", "forward_backward")

Inputs = dict[str, torch.Tensor]
Shape = tuple[int, ...]


class Output(NamedTuple):
    """What every method returns."""

    loss: torch.Tensor  # scalar that ``forward_backward`` calls ``backward()`` on
    sequence_logps: torch.Tensor  # [2 * pairs] policy log-probs, compared with the ground truth


Method = Callable[[Inputs], Output]


@dataclass(frozen=True)
class Suite:
    """One benchmark suite. Shapes are tuples named by ``dims``, dtypes are keys of ``DTYPES``."""

    name: str
    description: str  # one line for the report's headings; ``{pairs}`` is filled in
    dims: tuple[str, ...]  # what the numbers of a shape are, e.g. ("pairs", "seq_len", "vocab")
    make_inputs: Callable[[Shape, str], Inputs]  # the same inputs for every method, seeded
    grad_inputs: tuple[str, ...]  # the inputs that get gradients in ``forward_backward``
    ground_truth: Callable[[Inputs], torch.Tensor]  # float64 [2 * pairs] sequence log-probs
    logits_bytes: Callable[[Shape, str], int]  # size of the [2 * pairs, T, V] logits in dtype
    baseline: str  # the method every speed-up is measured against
    methods: dict[str, Method]  # fastdpo's methods and the baselines, all runnable here
    peers: dict[str, tuple[str, Method]]  # other libraries' methods: name -> (module needed, method)
    shapes: dict[str, dict[str, Shape]]  # pytest sizes, "quick" and "full": shape name -> shape
    sweeps: dict[str, dict]  # report sweeps, "quick" and "full" (see benchmarks.report.points)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # what both measure by default
    modes: tuple[str, ...] = ("forward_backward",)  # what the pytest suite times
    # Methods that compute something else (a memory-bandwidth floor): timed forward only, no error.
    forward_only: frozenset[str] = frozenset()
    # Bytes of the gradients a ``forward_backward`` call returns, if the probe should also report
    # the peak memory without them; None if not.
    returned_grad_bytes: Callable[[Inputs], int] | None = None
    # dtype -> why this machine runs it too slowly (empty: none): the report leaves it out unless
    # asked for, the pytest suite cuts its sequences short.
    slow_dtypes: Callable[[], dict[str, str]] = field(default=dict)

    def available(self) -> dict[str, Method]:
        """Every method this machine can run, fastdpo's and the baselines first, then the peers."""
        peers = {name: fn for name, (module, fn) in self.peers.items() if _installed(module)}
        return {**self.methods, **peers}

    def missing(self) -> list[str]:
        """The peers this machine cannot run, each with the module it lacks."""
        return [
            f"{name} ({module} not installed)"
            for name, (module, _) in self.peers.items()
            if not _installed(module)
        ]

    def method(self, name: str) -> Method:
        methods = self.available()
        if name not in methods:
            raise ValueError(
                f"unknown or unavailable {self.name} method {name!r}; available: {sorted(methods)}"
            )
        return methods[name]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_once(suite: Suite, fn: Method, inputs: Inputs, mode: str) -> None:
    """One call of ``fn``: ``forward`` (no autograd) or ``forward_backward`` (gradients of the
    suite's ``grad_inputs``, dropped afterwards). In-place methods may overwrite an input with its
    gradient, so later calls see other values; the work done, and so the time, does not change."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "forward":
        with torch.no_grad():
            fn(inputs)
        return
    leaves = [inputs[key] for key in suite.grad_inputs]
    for x in leaves:
        x.requires_grad_(True)
    fn(inputs).loss.backward()
    for x in leaves:
        x.grad = None
        x.requires_grad_(False)


def max_abs_error(fn: Method, inputs: Inputs, exact: torch.Tensor) -> float:
    """Largest per-sequence log-prob error of ``fn`` (forward) against the float64 ground truth."""
    with torch.no_grad():
        return (fn(inputs).sequence_logps.double() - exact).abs().max().item()
