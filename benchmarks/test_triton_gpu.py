"""GPU benchmarks of the triton backend, side by side in one run; skipped (with the reason) without CUDA.

    pytest benchmarks/test_triton_gpu.py --benchmark-only --benchmark-group-by=group

``test_sequence_logps_gpu`` times per-sequence log-probs from logits: fastdpo's triton kernels
against the naive reference, ``torch.compile`` of it and TRL's fused Triton log-prob kernel
(``trl.kernels.selective_log_softmax_and_entropy`` with its row mask; it also computes the
entropy, which TRL's trainer uses). ``test_dpo_loss_from_hidden_gpu`` times a whole DPO loss
from hidden states: the LM-head matmul + fastdpo's ``DPOLoss`` (triton, in-place backward)
against Liger's chunked ``LigerFusedLinearDPOLoss``.

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

from benchmarks.methods import DTYPES, SHAPES, make_inputs, run_once
from fastdpo import DPOLoss, sequence_logps
from fastdpo.naive import naive_sequence_logps

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the triton kernels only run compiled on CUDA "
    "(on CPU they are verified, not timed, under TRITON_INTERPRET=1 in tests/)",
)
ROUNDS = int(os.environ.get("FASTDPO_BENCH_ROUNDS", "10"))

# Peak DRAM bandwidth in GB/s (vendor data sheets); the longest name contained in
# torch.cuda.get_device_name() wins, so "A100-SXM4-80GB" beats "A100".
PEAK_GBPS = {
    "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "GH200": 4000,
    "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "A10G": 600, "A10": 600,
    "L40S": 864, "L40": 864, "L4": 300, "RTX 4090": 1008, "RTX 3090": 936, "V100": 900, "T4": 320,
    "MI300X": 5300, "MI250X": 3277,
}  # fmt: skip


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


def _trl_fused(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from trl.kernels import selective_log_softmax_and_entropy

    target = labels[:, 1:]
    mask = target != -100
    logps, _entropy = selective_log_softmax_and_entropy(logits[:, :-1], target.clamp(min=0), row_mask=mask)
    return (logps * mask).sum(-1)


_compiled = {}


def _reference_compiled(logits, labels):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(naive_sequence_logps, dynamic=False)
    return _compiled["fn"](logits, labels)


METHODS = {
    "fastdpo-triton": lambda x, y: sequence_logps(x, y, backend="triton"),
    "reference": naive_sequence_logps,
    "reference-compiled": _reference_compiled,
    "trl-fused-kernel": _trl_fused,
}


def _synchronized(fn, *args):
    fn(*args)
    torch.cuda.synchronize()


@pytest.fixture(scope="module", params=[(s, d) for s in SHAPES for d in DTYPES], ids=lambda p: "-".join(p))
def cuda_inputs(request):
    shape, dtype = request.param
    logits, labels = make_inputs(SHAPES[shape], dtype)
    return shape, dtype, logits.cuda(), labels.cuda()


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("method", list(METHODS))
def test_sequence_logps_gpu(benchmark, cuda_inputs, method, mode):
    shape, dtype, logits, labels = cuda_inputs
    benchmark.group = f"gpu {shape} {dtype} {mode}"
    benchmark.extra_info.update(shape=shape, dtype=dtype, mode=mode, method=method)
    benchmark.pedantic(
        _synchronized, args=(run_once, METHODS[method], logits, labels, mode),
        rounds=ROUNDS, warmup_rounds=2, iterations=1,
    )  # fmt: skip
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = statistics.median(benchmark.stats.stats.data)
        benchmark.extra_info.update(bandwidth_info(minimum_bytes(logits, labels, mode), median))


# (pairs, T, hidden, V): a Llama-3-8B head.
HIDDEN_SHAPE = (2, 512, 4096, 128256)


def _dpo_inputs():
    pairs, t, h, v = HIDDEN_SHAPE
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, t, h, generator=gen).bfloat16().cuda()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).bfloat16().cuda()
    labels = torch.randint(0, v, (2 * pairs, t), generator=gen)
    labels[:, : t // 4] = -100  # prompt tokens
    return hidden, weight, labels.cuda()


def _fastdpo_step(hidden, weight, labels, ref_hidden):
    loss_fn = DPOLoss(backend="triton", shift=False, inplace_backward=True)
    with torch.no_grad():
        ref_logits = ref_hidden @ weight.T
    loss_fn(hidden @ weight.T, labels, ref_logits).loss.backward()


def _liger_step(hidden, weight, labels, ref_hidden):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss, _aux = LigerFusedLinearDPOLoss(use_ref_model=True)(weight, hidden, labels, ref_input=ref_hidden,
                                                              ref_weight=weight.detach())  # fmt: skip
    loss.backward()


@pytest.mark.parametrize("method", ["fastdpo-triton", "liger-chunked-dpo"])
def test_dpo_loss_from_hidden_gpu(benchmark, method):
    hidden, weight, labels = _dpo_inputs()
    ref_hidden = hidden + 0.01 * torch.randn_like(hidden)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    step = _fastdpo_step if method == "fastdpo-triton" else _liger_step
    benchmark.group = f"gpu dpo-loss-from-hidden {HIDDEN_SHAPE} bfloat16 forward_backward"
    benchmark.extra_info.update(shape=HIDDEN_SHAPE, method=method)
    benchmark.pedantic(
        _synchronized,
        args=(step, hidden, weight, labels, ref_hidden),
        rounds=ROUNDS,
        warmup_rounds=2,
        iterations=1,
    )
    torch.cuda.reset_peak_memory_stats()
    _synchronized(step, hidden, weight, labels, ref_hidden)
    benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
