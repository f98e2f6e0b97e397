"""DPO loss from hidden states and the LM head: fastdpo's fused linear path against TRL's
chunked log-prob function, Liger's fused linear DPO loss and the unfused path (matmul + native
kernel), forward+backward, side by side in one run (methods: benchmarks/linear_methods.py).

    pytest benchmarks/test_linear_dpo.py --benchmark-only --benchmark-group-by=param:inputs

Peak extra memory of one call (fresh subprocess; with and without the gradients it returns,
also as a multiple of what the logits would take) and the largest per-sequence error against
float64 go into ``extra_info``. No timing asserts. FASTDPO_BENCH_ROUNDS sets the rounds
(default 3 after a warm-up). FASTDPO_LINEAR_SEQ_LEN overrides T (default 1024, the issue's
shape), e.g. for a quick look; on a CPU without native bfloat16 matmuls (no oneDNN bf16) the
bf16 peers would take hours at T=1024, so bf16 points there use T=64 and say so.
"""

import os

import pytest

from benchmarks.linear_methods import (
    DTYPES,
    SHAPES,
    available_methods,
    bf16_matmul_is_native,
    float64_policy_logps,
    make_inputs,
    max_abs_error,
    run_once,
)
from benchmarks.probe import probe_in_subprocess

ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "3"))
METHODS = available_methods()


def point(shape_name: str, dtype: str) -> tuple[int, int, int, int]:
    pairs, t, h, v = SHAPES[shape_name]
    t = int(os.environ.get("FASTDPO_LINEAR_SEQ_LEN", t))
    if dtype == "bfloat16" and not bf16_matmul_is_native():
        t = min(t, 64)
    return pairs, t, h, v


@pytest.fixture(
    scope="module", params=[(s, d) for s in SHAPES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}"
)
def inputs(request):
    shape_name, dtype = request.param
    shape = point(shape_name, dtype)
    x = make_inputs(shape, dtype)
    return shape_name, dtype, shape, x, float64_policy_logps(x)


@pytest.mark.parametrize("method", list(METHODS))
def test_linear_dpo_forward_backward(benchmark, inputs, method):
    shape_name, dtype, shape, x, exact = inputs
    benchmark.group = f"{shape_name} {dtype} T={shape[1]}"
    benchmark.extra_info.update(
        shape=shape, dtype=dtype, method=method, bf16_matmul_native=bf16_matmul_is_native()
    )
    benchmark.extra_info.update(probe_in_subprocess(method, shape, dtype, "forward_backward", suite="linear"))
    fn = METHODS[method]
    benchmark.extra_info["max_abs_error_vs_float64"] = max_abs_error(fn, x, exact)
    benchmark.pedantic(
        run_once, args=(fn, x, "forward_backward"), rounds=ROUNDS, warmup_rounds=1, iterations=1
    )
