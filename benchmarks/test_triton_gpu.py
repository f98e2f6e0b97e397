"""GPU benchmarks of the triton backend, side by side in one run; skipped (with the reason) without CUDA.

    pytest benchmarks/test_triton_gpu.py --benchmark-only --benchmark-group-by=group

Inputs, ``run_once`` and the method signature are the suites' (``benchmarks/suite.py``), at the
full shapes, moved to the GPU. ``test_sequence_logps_gpu`` times per-sequence log-probs from
logits (the ``logits`` suite): fastdpo's triton kernels against the naive implementation,
``torch.compile`` of it and TRL's fused Triton log-prob kernel
(``trl.kernels.selective_log_softmax_and_entropy`` with its row mask; it also computes the
entropy, which TRL's trainer uses). ``test_dpo_loss_from_hidden_gpu`` times a whole DPO loss
from hidden states (the ``linear`` suite's inputs at a Llama-3-8B head): the LM-head matmul +
fastdpo's ``DPOLoss`` (triton, in-place backward) against Liger's chunked
``LigerFusedLinearDPOLoss``.

Each point's ``extra_info`` holds the bytes the operation must move at least (the logits of
counted rows read once, the gradient written once; docs/triton.md) divided by the median time,
as GB/s and as a fraction of the device's peak bandwidth: from ``PEAK_GBPS`` by device name, or
``FASTDPO_PEAK_GBPS=<GB/s>`` for a device not in the table. No timing asserts.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from benchmarks.linear_suite import liger_dpo, unfused
from benchmarks.suite import Inputs, Output, run_once
from benchmarks.suites import SUITES
from fastdpo import sequence_logps

LOGITS, LINEAR = SUITES["logits"], SUITES["linear"]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the triton kernels only run compiled on CUDA "
    "(on CPU they are verified, not timed, under TRITON_INTERPRET=1 in tests/)",
)
ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "10"))

# Peak DRAM bandwidth in GB/s (vendor data sheets); the longest name contained in
# torch.cuda.get_device_name() wins, so "A100-SXM4-80GB" beats "A100".
PEAK_GBPS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "GH200": 4000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "A10G": 600,
    "A10": 600,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "V100": 900,
    "T4": 320,
    "MI300X": 5300,
    "MI250X": 3277,
}


def peak_gbps(device_name: str) -> float | None:
    """The device's peak bandwidth: ``FASTDPO_PEAK_GBPS`` if set, else the table, else None."""
    if os.environ.get("FASTDPO_PEAK_GBPS"):
        return float(os.environ["FASTDPO_PEAK_GBPS"])
    matches = [name for name in PEAK_GBPS if name in device_name]
    return PEAK_GBPS[max(matches, key=len)] if matches else None


def minimum_bytes(logits: torch.Tensor, labels: torch.Tensor, mode: str) -> int:
    """Bytes a fused kernel must move: each counted row of logits read once, labels read, three
    float32 values written per position; backward: counted rows read again, gradient written."""
    n, t, v = logits.shape
    counted = int((labels[:, 1:] != -100).sum())
    row = v * logits.element_size()
    total = counted * row + labels.numel() * labels.element_size() + 3 * n * (t - 1) * 4
    if mode == "forward_backward":
        total += counted * row + n * t * row
    return total


def bandwidth_info(nbytes: int, seconds: float) -> dict:
    achieved = nbytes / seconds / 1e9
    peak = peak_gbps(torch.cuda.get_device_name())
    return dict(
        device=torch.cuda.get_device_name(),
        minimum_bytes=nbytes,
        achieved_gbps=achieved,
        peak_gbps=peak,
        fraction_of_peak=achieved / peak if peak else "unknown device: set FASTDPO_PEAK_GBPS",
    )


def _trl_fused(x: Inputs) -> Output:
    from trl.kernels import selective_log_softmax_and_entropy

    target = x["labels"][:, 1:]
    mask = target != -100
    logps, _entropy = selective_log_softmax_and_entropy(
        x["logits"][:, :-1], target.clamp(min=0), row_mask=mask
    )
    logps = (logps * mask).sum(-1)
    return Output(logps.sum(), logps)


def _fastdpo_triton(x: Inputs) -> Output:
    logps = sequence_logps(x["logits"], x["labels"], backend="triton")
    return Output(logps.sum(), logps)


METHODS = {
    "fastdpo-triton": _fastdpo_triton,
    "naive": LOGITS.methods["naive"],
    "naive-compiled": LOGITS.methods["naive-compiled"],
    "trl-fused-kernel": _trl_fused,
}


def _synchronized(fn, *args):
    fn(*args)
    torch.cuda.synchronize()


def _cuda(inputs: Inputs) -> Inputs:
    return {key: x.cuda() for key, x in inputs.items()}


@pytest.fixture(
    scope="module", params=[(s, d) for s in LOGITS.shapes["full"] for d in LOGITS.dtypes], ids="-".join
)
def cuda_inputs(request):
    shape, dtype = request.param
    return shape, dtype, _cuda(LOGITS.make_inputs(LOGITS.shapes["full"][shape], dtype))


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("method", list(METHODS))
def test_sequence_logps_gpu(benchmark, cuda_inputs, method, mode):
    shape, dtype, inputs = cuda_inputs
    benchmark.group = f"gpu {shape} {dtype} {mode}"
    benchmark.extra_info.update(shape=shape, dtype=dtype, mode=mode, method=method)
    args = (run_once, LOGITS, METHODS[method], inputs, mode)
    benchmark.pedantic(_synchronized, args=args, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = statistics.median(benchmark.stats.stats.data)
        benchmark.extra_info.update(
            bandwidth_info(minimum_bytes(inputs["logits"], inputs["labels"], mode), median)
        )


# (pairs, T, hidden, V): a Llama-3-8B head.
HIDDEN_SHAPE = (2, 512, 4096, 128256)
HIDDEN_METHODS = {"fastdpo-triton": unfused("triton"), "liger-chunked-dpo": liger_dpo(compiled=True)}


@pytest.mark.parametrize("method", list(HIDDEN_METHODS))
def test_dpo_loss_from_hidden_gpu(benchmark, method):
    inputs = _cuda(LINEAR.make_inputs(HIDDEN_SHAPE, "bfloat16"))
    benchmark.group = f"gpu dpo-loss-from-hidden {HIDDEN_SHAPE} bfloat16 forward_backward"
    benchmark.extra_info.update(shape=HIDDEN_SHAPE, method=method)
    args = (run_once, LINEAR, HIDDEN_METHODS[method], inputs, "forward_backward")
    benchmark.pedantic(_synchronized, args=args, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    torch.cuda.reset_peak_memory_stats()
    _synchronized(*args)
    benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
