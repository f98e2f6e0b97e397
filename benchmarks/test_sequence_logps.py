"""sequence_logps: every available fastdpo backend against the naive reference, torch.compile of
it and TRL's selective_log_softmax, forward and forward+backward, side by side in one run.

    pytest benchmarks/test_sequence_logps.py --benchmark-only --benchmark-group-by=param:shape,param:dtype,param:mode

Peak extra memory (fresh subprocess per point) and, for forward, the largest per-sequence
error against float64 go into ``extra_info``. No timing asserts.
Set FASTDPO_BENCH_ROUNDS to trade time for precision (default 3 rounds after a warm-up).
"""

import os

import pytest

from benchmarks.methods import (
    DTYPES,
    FORWARD_ONLY,
    SHAPES,
    available_methods,
    float64_sequence_logps,
    make_inputs,
    max_abs_error,
    run_once,
)
from benchmarks.probe import probe_in_subprocess

ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "3"))
METHODS = available_methods()


@pytest.fixture(
    scope="module", params=[(s, d) for s in SHAPES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}"
)
def inputs(request):
    shape, dtype = request.param
    logits, labels = make_inputs(SHAPES[shape], dtype)
    return shape, dtype, (logits, labels), float64_sequence_logps(logits, labels)


CASES = [(m, mode) for mode in ("forward", "forward_backward") for m in METHODS
         if mode == "forward" or m not in FORWARD_ONLY]  # fmt: skip


@pytest.mark.parametrize(("method", "mode"), CASES)
def test_sequence_logps(benchmark, inputs, method, mode):
    shape, dtype, (logits, labels), exact = inputs
    benchmark.group = f"{shape} {dtype} {mode}"
    benchmark.extra_info.update(shape=shape, dtype=dtype, mode=mode, method=method)
    benchmark.extra_info.update(probe_in_subprocess(method, SHAPES[shape], dtype, mode))
    fn = METHODS[method]
    if mode == "forward" and method not in FORWARD_ONLY:
        benchmark.extra_info["max_abs_error_vs_float64"] = max_abs_error(fn, logits, labels, exact)
    benchmark.pedantic(
        run_once, args=(fn, logits, labels, mode), rounds=ROUNDS, warmup_rounds=1, iterations=1
    )
