"""The native fused linear kernel (csrc/fused_linear.cpp): both GEMM operand paths (bfloat16
operands where the CPU has bf16 instructions, float32 operands forced with
FASTDPO_LINEAR_OPERANDS=float32 as on CPUs without them) against float64, masked vocabularies,
bitwise determinism across thread counts in fresh processes, op registration.

tests/test_linear.py runs the shared parity suite on the native backend with its default path."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import GRAD_TOL
from test_linear import _check, _run, make_linear

from fastdpo import FusedLinearDPOLoss, fused_linear_logps
from fastdpo.backends import native_linear
from fastdpo.backends.linear_tiles import Rows

BF16_OPERANDS = native_linear.operand_dtype(torch.bfloat16, 64) == torch.bfloat16
needs_bf16_cpu = pytest.mark.skipif(
    not BF16_OPERANDS, reason="this CPU has no bfloat16 instructions: only the float32-operand path exists"
)


@pytest.fixture(params=["auto", "float32"])
def operands(request, monkeypatch):
    """Run a test on the default operand path and on the forced float32 one."""
    monkeypatch.setenv(native_linear.OPERANDS_ENV, request.param)
    return request.param


# (N, T, H, V, row_tile, vocab_tile): ragged row and vocabulary tiles, odd tile sizes (the
# bfloat16 operands pad K to even), an odd hidden size (float32 operands), one tile; hidden
# sizes over one GEMM slice (fused_linear.h kGemmSlice = 512: K = H cut in 512, 512 and a
# remainder, even and odd).
CASES = [
    (4, 9, 16, 37, 5, 8),
    (2, 12, 6, 33, 7, 33),
    (6, 7, 24, 130, 3, 63),
    (2, 20, 5, 19, 64, 512),
    (2, 5, 1100, 37, 4, 16),
    (2, 5, 1031, 29, 3, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_parity_with_float64_on_both_operand_paths(operands, dtype, case):
    n, t, h, v, row_tile, vocab_tile = case
    # Large hidden sizes get a head scaled by h^-1/2, as trained heads are: logits of O(1), not
    # O(sqrt(h)) (whose peaked softmax the float32 tolerances are not made for, on any backend).
    scale = 0.7 if h <= 64 else h**-0.5
    hidden, weight, bias, labels = make_linear(n, t, h, v, dtype, weight_scale=scale)
    _check("native", hidden, weight, bias, labels, tiles=(row_tile, vocab_tile))


def test_operand_choice_and_the_forced_float32_path(monkeypatch):
    assert native_linear.operand_dtype(torch.float32, 64) == torch.float32
    assert native_linear.operand_dtype(torch.float16, 64) == torch.float32
    assert native_linear.operand_dtype(torch.bfloat16, 63) == torch.float32  # odd H: no VNNI pairs
    monkeypatch.setenv(native_linear.OPERANDS_ENV, "float32")
    assert native_linear.operand_dtype(torch.bfloat16, 64) == torch.float32
    monkeypatch.setenv(native_linear.OPERANDS_ENV, "fp8")
    with pytest.raises(ValueError, match="FASTDPO_LINEAR_OPERANDS must be 'auto' or 'float32'"):
        native_linear.half_operands()


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's own note
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_onednn(dtype):
    """With oneDNN off, brgemm has no ukernel: bfloat16 inputs take float32 operands and the
    float32 products go through ATen's fallback GEMM, still exact to float32."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert native_linear.operand_dtype(torch.bfloat16, 16) == torch.float32
        hidden, weight, bias, labels = make_linear(4, 9, 16, 37, dtype)
        _check("native", hidden, weight, bias, labels, tiles=(5, 8))


@needs_bf16_cpu
def test_the_two_paths_really_differ_and_agree(monkeypatch):
    """On a bf16 CPU the default path multiplies in bfloat16: not bitwise the float32 path's
    result (so the switch is real), yet within float32 rounding of it."""
    hidden, weight, bias, labels = make_linear(4, 33, 64, 301, torch.bfloat16)
    fast, fast_grads, _, _ = _run("native", hidden, weight, bias, labels)
    monkeypatch.setenv(native_linear.OPERANDS_ENV, "float32")
    slow, slow_grads, _, _ = _run("native", hidden, weight, bias, labels)
    assert not torch.equal(fast.token_logps, slow.token_logps)
    torch.testing.assert_close(fast.token_logps, slow.token_logps, atol=2e-5, rtol=1e-5)
    rtol, atol = GRAD_TOL[torch.bfloat16]
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_vocabulary_gives_no_nan(operands, dtype):
    """A -inf bias over whole vocabulary blocks (first, middle and last) leaves tiles that are
    all -inf for every row: log-probs and gradients stay exact and finite."""
    hidden, weight, bias, labels = make_linear(4, 10, 16, 70, dtype)
    masked = torch.zeros(70, dtype=torch.bool)
    masked[:16] = masked[32:48] = masked[64:] = True
    bias = bias.masked_fill(masked, -torch.inf)
    labels = labels.masked_fill(masked[labels.clamp(min=0)] & (labels >= 0), 20)
    out, grads = _check("native", hidden, weight, bias, labels, tiles=(3, 16))
    assert torch.isfinite(out.token_logps).all()
    assert all(torch.isfinite(g).all() for g in grads[:2])
    assert (grads[2][masked] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored_rows_and_no_counted_row(operands, dtype):
    hidden, weight, bias, labels = make_linear(4, 6, 8, 19, dtype)
    labels[1] = -100
    hidden[1] = float("nan")  # never read
    out, grads, _, _ = _run("native", hidden, weight, bias, labels, tiles=(4, 8))
    assert out.sequence_logps[1] == 0 and all(torch.isfinite(g).all() for g in grads)
    labels[:] = -100
    out, grads, _, _ = _run("native", hidden, weight, bias, labels)
    assert (out.sequence_logps == 0).all() and all((g == 0).all() for g in grads)


_DETERMINISM = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from fastdpo import FusedLinearDPOLoss
from fastdpo.backends import native_linear
from fastdpo.linear_dpo import kept_dtype
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    hidden = torch.randn(4, 97, 64, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(1500, 64, generator=g) * 0.2).to(dtype).requires_grad_(True)
    bias = torch.randn(1500, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 1500, (4, 97), generator=g)
    ref = torch.randn(4, 97, 64, generator=g).to(dtype)
    # What 300 rows keep: the first 256-row tile kept, the other 128 rows recomputed.
    plan = native_linear.plan_tiles(dtype, 64)
    part = 300 * (kept_dtype(plan).itemsize * 1500 + 4 * 3) / 2**20
    for budget in (256.0, part, 0.0):  # all rows kept, some, none (the recompute path)
        loss_fn = FusedLinearDPOLoss(backend="native", memory_budget_mib=budget)
        out = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref)
        out.loss.backward()
        digest = hashlib.sha256()
        for t in (out.loss, out.policy_chosen_logps, out.ref_rejected_logps, hidden.grad, weight.grad, bias.grad):
            digest.update(t.detach().float().numpy().tobytes())
        print(dtype, budget, type(out.loss.grad_fn).__name__, digest.hexdigest())
        hidden.grad = weight.grad = bias.grad = None
"""


def thread_digests(script: str, forced: str) -> list[str]:
    """What ``script`` prints in fresh processes with 1 and 2 threads (the thread pool is set
    before any work), on the operand path ``forced``."""
    env = dict(os.environ, **{native_linear.OPERANDS_ENV: forced})
    run = [sys.executable, "-c", script]
    return [
        subprocess.run(run + [str(n)], env=env, capture_output=True, text=True, check=True).stdout
        for n in (1, 2)
    ]


@pytest.mark.parametrize("forced", ["auto", "float32"])
def test_bitwise_equal_for_one_and_two_threads(forced):
    """The loss, log-probs and every gradient hash the same with 1 and 2 threads, on both
    operand paths, with every row's logits kept, some, and none (the recompute path)."""
    digests = thread_digests(_DETERMINISM, forced)
    assert digests[0].count("_LossInForwardBackward") == 6 and digests[0].count("torch.") == 9
    assert digests[0] == digests[1]


def test_strided_weight_and_hidden_are_read_correctly():
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37)
    wide = torch.randn(37, 40)
    wide[:, 3:19] = weight
    strided_weight = wide[:, 3:19]
    a = fused_linear_logps(hidden, strided_weight, labels, bias=bias, backend="native", vocab_tile=8)
    b = fused_linear_logps(hidden, weight, labels, bias=bias, backend="native", vocab_tile=8)
    torch.testing.assert_close(a.token_logps, b.token_logps, atol=0, rtol=0)


def test_ops_check_their_arguments():
    hidden, weight, bias, labels = make_linear(2, 5, 8, 9, ignore_frac=0.0)
    n, t = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    rows = Rows(n, t, labels[:, 1:].reshape(-1))
    plan = native_linear.plan_tiles(torch.float32, 8)
    with pytest.raises(RuntimeError, match=r"label \d+ of row 0 is outside \[0, 9\)"):
        native_linear.forward_tiles(hidden, weight, bias, rows._replace(label=rows.label + 9), None, plan)
    with pytest.raises(RuntimeError, match=r"is outside hidden's \[2, 5\]"):
        native_linear.forward_tiles(hidden, weight, bias, rows._replace(t=rows.t + 5), None, plan)
    with pytest.raises(RuntimeError, match="weight must be Float, got BFloat16"):
        native_linear.forward_tiles(hidden, weight.bfloat16(), None, rows, None, plan)
    with pytest.raises(RuntimeError, match="hidden_grad must have hidden's shape"):
        native_linear.forward_tiles(hidden, weight, bias, rows, None, plan, torch.zeros(2, 5, 7))


def test_opcheck():
    """Schemas, fake implementations and aliasing of the ops, as torch.library checks them."""
    hidden, weight, bias, labels = make_linear(2, 5, 8, 9, ignore_frac=0.0)
    n, t, y = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2), labels[:, 1:].reshape(-1)
    native_linear.forward_tiles(
        hidden, weight, bias, Rows(n, t, y), None, native_linear.plan_tiles(torch.float32, 8)
    )
    grad = torch.zeros_like(hidden)
    torch.library.opcheck(torch.ops.fastdpo.linear_forward, (hidden, weight, bias, n, t, y, grad, 4, 4, True))
    torch.library.opcheck(torch.ops.fastdpo.linear_forward, (hidden, weight, None, n, t, y, None, 4, 4, True))
    torch.library.opcheck(
        torch.ops.fastdpo.linear_forward, (hidden, weight, bias, n, t, y, grad, 4, 4, True, True)
    )
    lse = torch.ops.fastdpo.linear_forward(hidden, weight, bias, n, t, y, None, 4, 4, True)[1]
    args = (hidden, weight, bias, n, t, y, lse, torch.randn(8), True, True, 4, 4, True)
    torch.library.opcheck(torch.ops.fastdpo.linear_weight_grad, args)


def test_dpo_loss_on_both_operand_paths_matches_the_torch_backend(operands):
    hidden, weight, bias, labels = make_linear(6, 11, 32, 97, torch.bfloat16)
    ref_hidden = make_linear(6, 11, 32, 97, torch.bfloat16, seed=5)[0]
    results = []
    for backend in ("native", "torch"):
        x = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
        out = FusedLinearDPOLoss(backend=backend)(x[0], x[1], labels, bias=x[2], ref_hidden=ref_hidden)
        out.loss.backward()
        results.append((out, [z.grad for z in x]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.policy_chosen_logps, b.policy_chosen_logps, atol=1e-4, rtol=1e-5)
    rtol, atol = GRAD_TOL[torch.bfloat16]
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.float(), y.float(), atol=2 * atol, rtol=2 * rtol)
