"""Token statistics (``statistics=True``): entropy, log sum p^2, top-1 and mean logit from the
same pass as the log-probs, against float64 on every backend that computes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks.ground_truth import float64_token_statistics
from fastdpo import fused_logps
from fastdpo.backends import common
from tests.helpers import DTYPES, assert_close_verbose, make_inputs

ROOT = Path(__file__).resolve().parents[1]
# Backends whose forward_statistics kernel exists; a backend joins by adding its name.
STAT_BACKENDS = ["torch", "native", "triton"]
SHAPES = [(2, 7, 33), (3, 5, 1000), (1, 9, 4099)]
# float32 sums over V of p log p and p^2; the mean logit is a float32 sum over V divided by V.
STAT_ATOL = 2e-4


def check_statistics(logits, labels, backend, *, ignore_index=-100, shift=True):
    out = fused_logps(
        logits, labels, backend=backend, statistics=True, ignore_index=ignore_index, shift=shift
    )
    want = float64_token_statistics(logits, labels, ignore_index=ignore_index, shift=shift)
    for name, expected in want.items():
        actual = getattr(out.statistics, name)
        assert actual.dtype == expected.dtype if name == "is_top1" else actual.dtype == torch.float32, name
        if name == "is_top1":
            assert torch.equal(actual, expected), (
                f"{backend} is_top1 differs at {(actual != expected).nonzero()}"
            )
        else:
            scale = max(1.0, logits.float().abs().max().item()) if name == "mean_logits" else 1.0
            assert_close_verbose(actual, expected, atol=STAT_ATOL * scale, what=f"{backend} {name}")
    return out


@pytest.mark.parametrize("backend", STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shift", [True, False])
def test_statistics_match_float64(backend, dtype, shape, shift):
    logits, labels = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    check_statistics(logits, labels, backend, shift=shift)


@pytest.mark.parametrize("backend", STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_leave_the_log_probs_and_gradient_unchanged(backend, dtype):
    logits, labels = make_inputs(2, 11, 517, dtype=dtype, seed=5)
    plain_in = logits.clone().requires_grad_(True)
    stats_in = logits.clone().requires_grad_(True)
    plain = fused_logps(plain_in, labels, backend=backend)
    with_stats = fused_logps(stats_in, labels, backend=backend, statistics=True)
    for field in ("token_logps", "sequence_logps", "counts", "logit_sums"):
        assert torch.equal(getattr(plain, field), getattr(with_stats, field)), field
    assert plain.statistics is None
    plain.sequence_logps.sum().backward()
    with_stats.sequence_logps.sum().backward()
    assert torch.equal(plain_in.grad, stats_in.grad)
    assert not any(s.requires_grad for s in with_stats.statistics)


@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_statistics_of_ignored_and_all_ignored_rows_are_zero(backend):
    logits, labels = make_inputs(3, 8, 64, dtype=torch.float32, seed=2)
    labels[1] = -100  # a sequence with nothing counted
    labels[0, 3:5] = -100
    logits[1] = torch.nan  # never read: the rows are ignored
    out = check_statistics(logits, labels, backend)
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.equal(getattr(out.statistics, name)[1], torch.zeros(7)), name
    assert not out.statistics.is_top1[1].any()


@pytest.mark.parametrize("backend", STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_of_masked_vocabularies(backend, dtype):
    """-inf logits (masked tokens) are legal: p = 0 adds nothing to the entropy or to sum p^2."""
    logits, labels = make_inputs(2, 6, 300, dtype=dtype, seed=9)
    logits[..., :40] = -torch.inf  # leading block
    logits[..., 150:170] = -torch.inf  # interior
    logits[0, :, 41:] = -torch.inf  # all but one token of sequence 0: entropy 0, log sum p^2 = 0
    labels = labels.clamp(min=40)
    labels[0, 1:] = 40
    labels[1, 1:] = torch.where(labels[1, 1:].sub(150).clamp(min=0) < 20, 200, labels[1, 1:])
    out = check_statistics(logits, labels, backend)
    assert torch.equal(out.statistics.entropy[0], torch.zeros(5))
    assert out.statistics.is_top1[0].all()


@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_is_top1_counts_the_first_maximum(backend):
    """Ties (common in bfloat16): argmax's first maximum is the top-1, as TRL counts it."""
    logits = torch.zeros(1, 3, 8)
    logits[0, :, 2] = logits[0, :, 5] = 4.0  # two maxima per row
    labels = torch.tensor([[0, 2, 5]])  # shifted: position 0 scores 2 (first max), 1 scores 5
    out = fused_logps(logits, labels, backend=backend, statistics=True)
    assert out.statistics.is_top1.tolist() == [[True, False]]


@pytest.mark.parametrize("backend", STAT_BACKENDS)
def test_large_logits_give_finite_statistics(backend):
    logits, labels = make_inputs(2, 5, 100, dtype=torch.float32, seed=4)
    logits = logits * 1e4  # a one-hot distribution: entropy 0 up to rounding, log sum p^2 = 0
    check_statistics(logits, labels, backend)


@pytest.mark.parametrize("backend", STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_over_many_blocks_with_a_growing_max(monkeypatch, backend, dtype):
    """Blocks of 64 (the triton kernel's online fold; the torch backend has no blocks): the max
    grows block after block, so every rescale of the running sums is exercised; a masked block
    (-inf) comes first in some rows, the last block is partial, and ties straddle blocks."""
    monkeypatch.setattr(common, "MAX_BLOCK_V", 64)
    logits, labels = make_inputs(2, 6, 1000, dtype=torch.float32, seed=3)
    logits = logits + torch.linspace(0, 12, 1000)
    logits[0, :, :64] = -torch.inf  # a whole masked block before the first finite one
    logits[1, 2, 10] = logits[1, 2, 900] = 40.0  # equal maxima in blocks 0 and 14: the first wins
    labels[1, 3], labels[0, 2] = 900, 999  # a tied label that is not the top-1; a late one
    labels[0] = labels[0].clamp(min=64)
    check_statistics(logits.to(dtype), labels, backend)
    out = fused_logps(logits.to(dtype), labels, backend=backend, statistics=True)
    assert not out.statistics.is_top1[1, 2]


# The triton statistics kernels beyond the interpreter: their op's registration, and the real
# kernels compiled for a GPU (sm_80; no GPU needed) as tests/test_triton.py does for the others.

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastdpo.backends import triton_kernels as tk, triton_tiles as tt

    def compile_kernel(fn, types, constexprs):
        signature = {name: "constexpr" if name in constexprs else types.get(name, "*fp32" if
                     name.endswith("_ptr") else "i32") for name in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        ttir = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": 8}).asm["ttir"]
        strides = [l for l in ttir.splitlines() if re.search(r"%stride(_[nt])?[ ,)]", l) and "tt.func" not in l]
        return dict(strides=strides, stores=ttir.count("tt.store"), exps=ttir.count("math.exp"))

    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        types = {"logits_ptr": "*" + dtype, "labels_ptr": "*i64", "top1_ptr": "*u8"}
        for flag in (0, 1):
            out[f"forward-{dtype}-{flag}"] = compile_kernel(
                tk._forward_kernel, types, {"SHIFT": 1, "BLOCK_V": 4096, "STATISTICS": flag}
            )
    for flag in (0, 1):
        out[f"fold-{flag}"] = compile_kernel(tt._lse_fold_kernel, {"top_ptr": "*i64"}, {"BLOCK": 1024, "STATISTICS": flag})
    print(json.dumps(out))
    """
)


def test_triton_statistics_kernels_compile_for_a_gpu():
    """The forward kernel with its STATISTICS flag compiles for sm_80 in the three dtypes with its
    strides widened to int64 before any arithmetic, and without the flag stores only the plain
    outputs; the tile fold without its STATISTICS flag compiles to the plain
    fold (4 outputs and the tile stored, 2 exponentials), the flag adds the statistics' work."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = json.loads(result.stdout.strip().splitlines()[-1])
    for dtype in ("fp32", "bf16", "fp16"):
        strides = kernels[f"forward-{dtype}-1"]["strides"]
        assert strides and all("arith.extsi" in line and "i32 to i64" in line for line in strides), strides
        # without the flag the statistics' stores compile away: 3 outputs at each of the two exits
        assert kernels[f"forward-{dtype}-0"]["stores"] == 6, kernels[f"forward-{dtype}-0"]
        assert kernels[f"forward-{dtype}-1"]["stores"] == 14, kernels[f"forward-{dtype}-1"]
    assert kernels["fold-0"]["stores"] == 5 and kernels["fold-0"]["exps"] == 2, kernels["fold-0"]
    assert kernels["fold-1"]["stores"] == 8, kernels["fold-1"]


@pytest.mark.parametrize("shift", [True, False])
def test_opcheck_triton_statistics_op(shift):
    from fastdpo.backends import triton_kernels as tk

    if not tk.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no GPU)")
    logits, labels = make_inputs(3, 6, 37, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fastdpo.triton_logps_forward_statistics, (logits, labels, -100, shift))
