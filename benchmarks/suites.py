"""Every benchmark suite by name (the interface: ``benchmarks/suite.py``).

- ``logits`` (``benchmarks/logits_suite.py``): per-sequence log-probs from logits;
- ``linear`` (``benchmarks/linear_suite.py``): the DPO loss from hidden states and the LM head.

A new suite is a :class:`~benchmarks.suite.Suite` in its own module plus one entry here.
"""

from __future__ import annotations

from benchmarks import linear_suite, logits_suite
from benchmarks.suite import Suite

SUITES: dict[str, Suite] = {suite.name: suite for suite in (logits_suite.SUITE, linear_suite.SUITE)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose one of {list(SUITES)}")
    return SUITES[name]
