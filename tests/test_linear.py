"""The fused linear path (hidden states + LM head, no logits) against float64 ground truth and
against the logits path applied to ``hidden @ weight.T + bias``: forward and the gradients of
hidden, weight and bias, every backend's tile kernels, float32/bfloat16/float16, odd sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BACKENDS,
    BIAS_MASKS,
    DTYPES,
    GRAD_TOL,
    LOGP_ATOL,
    assert_close_verbose,
    ground_truth_token_logps,
    make_linear,
    make_masked_linear,
)

from fastdpo import DPOLoss, FusedLinearDPOLoss, fused_linear_logps, fused_logps, linear_sequence_logps
from fastdpo.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]

# (N, T, H, V, row_tile, vocab_tile): several row and vocabulary tiles with ragged last ones,
# a single tile, T of 2, a vocabulary smaller than one tile, a batch of one pair.
CASES = [(4, 9, 16, 37, 5, 8), (2, 2, 8, 5, 64, 512), (6, 7, 24, 130, 4, 64), (2, 12, 5, 33, 7, 33)]


def ground_truth(hidden, weight, bias, labels, w_tok, w_seq, *, ignore_index=-100, shift=True):
    """float64 token log-probs and gradients of sum(w_tok * tok) + sum(w_seq * seq)."""
    x = [z.detach().double().requires_grad_(True) if z is not None else None for z in (hidden, weight, bias)]
    logits = x[0] @ x[1].T + (x[2] if x[2] is not None else 0)
    tok = ground_truth_token_logps(logits, labels, ignore_index=ignore_index, shift=shift)
    ((tok * w_tok.double()).sum() + (tok.sum(-1) * w_seq.double()).sum()).backward()
    return tok, [z.grad if z is not None else None for z in x]


def _run(backend, hidden, weight, bias, labels, *, shift=True, ignore_index=-100, tiles=(None, None)):
    x = [z.clone().requires_grad_(True) if z is not None else None for z in (hidden, weight, bias)]
    out = fused_linear_logps(
        x[0],
        x[1],
        labels,
        bias=x[2],
        ignore_index=ignore_index,
        shift=shift,
        backend=backend,
        row_tile=tiles[0],
        vocab_tile=tiles[1],
    )
    gen = torch.Generator().manual_seed(1)
    w_tok = torch.randn(out.token_logps.shape, generator=gen)
    w_seq = torch.randn(out.sequence_logps.shape, generator=gen)
    ((out.token_logps * w_tok).sum() + (out.sequence_logps * w_seq).sum()).backward()
    return out, [z.grad if z is not None else None for z in x], w_tok, w_seq


def _check(backend, hidden, weight, bias, labels, *, shift=True, ignore_index=-100, tiles=(None, None)):
    dtype = hidden.dtype
    out, grads, w_tok, w_seq = _run(
        backend, hidden, weight, bias, labels, shift=shift, ignore_index=ignore_index, tiles=tiles
    )
    exact, exact_grads = ground_truth(
        hidden, weight, bias, labels, w_tok, w_seq, shift=shift, ignore_index=ignore_index
    )
    assert out.token_logps.dtype == torch.float32
    # assert_close_verbose compares err.max() > atol, which a NaN never is: rule NaN out first.
    assert torch.isfinite(out.token_logps).all() and torch.isfinite(out.sequence_logps).all()
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert_close_verbose(out.token_logps, exact, atol=LOGP_ATOL[dtype], what="token_logps")
    assert_close_verbose(
        out.sequence_logps, exact.sum(-1), atol=LOGP_ATOL[dtype] * exact.shape[1], what="sequence_logps"
    )
    rtol, atol = GRAD_TOL[dtype]
    for name, got, want in zip(("hidden", "weight", "bias"), grads, exact_grads):
        if want is None:
            continue
        assert got.dtype == dtype, name
        # bfloat16/float16 hidden gradients are rounded twice (d logp/d h, then times g): 2 ulps.
        scale = 2 if name == "hidden" and dtype != torch.float32 else 1
        assert_close_verbose(got, want, atol=atol * scale, rtol=rtol * scale, what=f"grad {name}")
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_parity_with_float64(backend, dtype, case):
    n, t, h, v, row_tile, vocab_tile = case
    hidden, weight, bias, labels = make_linear(n, t, h, v, dtype)
    _check(backend, hidden, weight, bias, labels, tiles=(row_tile, vocab_tile))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_no_bias_shift_and_ignore_index(backend, shift, ignore_index):
    hidden, weight, _, labels = make_linear(4, 6, 8, 21, bias=False, ignore_index=ignore_index)
    labels[0, 2] = 3  # with ignore_index=3 this label is ignored, not scored
    _check(backend, hidden, weight, None, labels, shift=shift, ignore_index=ignore_index, tiles=(3, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_logits_path(backend, dtype):
    """Same numbers as the logits API on ``hidden @ weight.T + bias`` (logits made in float32)."""
    hidden, weight, bias, labels = make_linear(4, 8, 12, 45, dtype)
    out, grads, w_tok, w_seq = _run(backend, hidden, weight, bias, labels, tiles=(5, 16))
    x = [z.float().requires_grad_(True) for z in (hidden, weight, bias)]
    ref = fused_logps(x[0] @ x[1].T + x[2], labels, backend=backend)
    ((ref.token_logps * w_tok).sum() + (ref.sequence_logps * w_seq).sum()).backward()
    torch.testing.assert_close(out.token_logps, ref.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logit_sums, ref.logit_sums, atol=1e-3, rtol=1e-5)
    assert torch.equal(out.counts, ref.counts)
    rtol, atol = GRAD_TOL[dtype]
    for got, want in zip(grads, x):
        assert_close_verbose(
            got.float(), want.grad.to(dtype).float(), atol=2 * atol, rtol=2 * rtol, what="grad"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows_give_zero_and_zero_grad(backend):
    hidden, weight, bias, labels = make_linear(4, 6, 8, 19)
    labels[1] = -100
    labels[2, 1:] = -100
    hidden[1] = float("nan")  # never read: ignored rows are not projected
    out, grads, _, _ = _run(backend, hidden, weight, bias, labels, tiles=(4, 8))
    assert out.sequence_logps[1] == 0 and out.sequence_logps[2] == 0
    assert out.counts[1] == 0 and torch.isfinite(out.sequence_logps).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][1] == 0).all() and (grads[0][2] == 0).all() and (grads[0][:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_ignored(backend):
    hidden, weight, bias, labels = make_linear(2, 5, 8, 9)
    labels[:] = -100
    out, grads, _, _ = _run(backend, hidden, weight, bias, labels)
    assert (out.token_logps == 0).all() and (out.sequence_logps == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_strided_hidden_view(backend):
    """A hidden-state view (every other position, a slice of a wider buffer) is read in place and
    its gradient lands in the right places of the base tensor."""
    big, weight, bias, _ = make_linear(4, 14, 20, 31)
    base = big.clone().requires_grad_(True)
    view = base[:, ::2, :16]
    _, _, _, labels = make_linear(4, 7, 16, 31, seed=3)
    w = weight[:, :16].contiguous()
    seq = linear_sequence_logps(view, w, labels, bias=bias, backend=backend)
    seq.sum().backward()
    ref = base.detach().clone().requires_grad_(True)
    fused_logps(ref[:, ::2, :16] @ w.T + bias, labels, backend=backend).sequence_logps.sum().backward()
    torch.testing.assert_close(seq, linear_sequence_logps(view.detach().contiguous(), w, labels, bias=bias))
    torch.testing.assert_close(base.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_no_grad_forward_equals_grad_forward_and_skips_gradient_work():
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37)
    with torch.no_grad():
        plain = fused_linear_logps(hidden.requires_grad_(True), weight, labels, bias=bias)
    assert plain.sequence_logps.grad_fn is None
    tracked = fused_linear_logps(hidden, weight, labels, bias=bias)
    assert tracked.sequence_logps.grad_fn is not None
    torch.testing.assert_close(plain.token_logps, tracked.token_logps.detach(), atol=0, rtol=0)


def test_only_the_weight_needs_a_gradient():
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37)
    w = weight.clone().requires_grad_(True)
    linear_sequence_logps(hidden, w, labels, bias=bias).sum().backward()
    w2 = weight.clone().requires_grad_(True)
    fused_logps(hidden @ w2.T + bias, labels).sequence_logps.sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_second_backward_is_a_clear_error():
    hidden, weight, bias, labels = make_linear(2, 5, 8, 9)
    h = hidden.clone().requires_grad_(True)
    seq = linear_sequence_logps(h, weight, labels, bias=bias)
    seq.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        seq.sum().backward()


# Runs each case with 1 and then 2 threads, once with torch's matmuls and once with a fixed-order
# one in their place, and saves every output and gradient.
_THREADS_SCRIPT = """
import sys, torch
from test_linear import _run, make_linear
from fastdpo.backends import linear_tiles

def fixed_order_matmul(a, b):  # element-wise, k by k: the same sums at any thread count
    out = torch.zeros(a.shape[0], b.shape[1])
    for k in range(a.shape[1]):
        out += a[:, k, None].float() * b[None, k].float()
    return out

real = (linear_tiles._matmul_f32, linear_tiles._accumulate)
fixed = (fixed_order_matmul, lambda acc, a, b: acc.add_(fixed_order_matmul(a, b)))
results = {}
for matmul, (project, accumulate) in (("torch", real), ("fixed", fixed)):
    linear_tiles._matmul_f32, linear_tiles._accumulate = project, accumulate
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for backend in ("torch", "native"):
            for dtype in (torch.float32, torch.bfloat16):
                for shape, tiles in (((4, 33, 24, 301), (16, 64)), ((2, 7, 24, 2053), (5, 512))):
                    out, grads, _, _ = _run(backend, *make_linear(*shape, dtype), tiles=tiles)
                    key = (matmul, backend, str(dtype), shape)
                    results.setdefault(key, []).append([out.token_logps, out.sequence_logps, out.logit_sums, *grads])
torch.save(results, sys.argv[1])
"""


def test_one_and_two_threads(tmp_path):
    """Where the fused linear path depends on the thread count: only in torch's matmuls (MKL
    sums the rows of a product in thread-dependent blocks for some row counts, e.g. a last row
    tile of 5 rows). With a fixed-order matmul in their place every output and gradient is
    bitwise equal for 1 and 2 threads; with torch's own they agree to float32 rounding."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(tmp_path / "out.pt")], env=env, check=True, timeout=300
    )
    for (matmul, *case), (one, two) in torch.load(tmp_path / "out.pt").items():
        for name, a, b in zip(("token", "sequence", "logit_sums", "hidden", "weight", "bias"), one, two):
            if matmul == "fixed":
                assert torch.equal(a, b), (case, name)
            else:
                rtol = 1e-5 if name in ("hidden", "weight", "bias") else 1e-6
                torch.testing.assert_close(a, b, atol=1e-6, rtol=rtol)


def test_tile_kernels_agree_across_backends():
    """The tile kernels of every backend against the torch ones, including a row whose running
    max is -inf (first tile) and labels outside the tile."""
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(6, 37, generator=gen) * 4
    run_max = torch.tensor([-torch.inf, 0.0, 5.0, -1.0, 20.0, -torch.inf])
    run_sum = torch.tensor([0.0, 1.5, 2.0, 0.5, 1.0, 0.0])
    labels = torch.tensor([0, 36, 37, -1, 5, 100])
    lse, g = tile.amax(1) + 1.0, torch.randn(6, generator=gen)
    ref = get_backend("torch")
    want_fold = ref.lse_fold(tile.clone(), run_max, run_sum)
    want_grad = tile.clone()
    ref.softmax_grad_tile(want_grad, labels, lse, g)
    for name in BACKENDS[1:]:
        kernels = get_backend(name)
        x = tile.clone()
        for got, want in zip(kernels.lse_fold(x, run_max, run_sum), want_fold):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        y = tile.clone()
        kernels.softmax_grad_tile(y, labels, lse, g)
        torch.testing.assert_close(y, want_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", BIAS_MASKS)
def test_masked_vocabulary_bias(backend, dtype, mask):
    hidden, weight, bias, labels, _ = make_masked_linear(dtype, mask)
    _check(backend, hidden, weight, bias, labels, tiles=(5, 8))  # finite, and right


def test_tile_folds_of_masked_rows():
    """A row whose running max is -inf meets a tile that is all -inf (a masked vocabulary block):
    its statistics stay (-inf, 0), the tile becomes zeros, nothing is NaN; the next, finite tile
    folds in as if it were the first."""
    gen = torch.Generator().manual_seed(0)
    masked = torch.full((3, 16), -torch.inf)
    finite = torch.randn(3, 16, generator=gen) * 4
    start_max, start_sum = torch.full((3,), -torch.inf), torch.zeros(3)
    want_max, want_sum, _, _ = get_backend("torch").lse_fold(finite.clone(), start_max, start_sum)
    for name in BACKENDS:
        kernels = get_backend(name)
        tile = masked.clone()
        run_max, run_sum, rescale, logit_sum = kernels.lse_fold(tile, start_max, start_sum)
        assert (run_max == -torch.inf).all() and (run_sum == 0).all() and (rescale == 0).all(), name
        assert (tile == 0).all() and (logit_sum == -torch.inf).all(), name
        run_max, run_sum, _, _ = kernels.lse_fold(finite.clone(), run_max, run_sum)
        torch.testing.assert_close(run_max, want_max, atol=0, rtol=0)
        torch.testing.assert_close(run_sum, want_sum, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# FusedLinearDPOLoss


def _dpo_inputs(pairs=3, t=8, h=12, v=41, dtype=torch.float32):
    hidden, weight, bias, labels = make_linear(2 * pairs, t, h, v, dtype)
    ref_hidden, ref_weight, ref_bias, _ = make_linear(2 * pairs, t, h, v, dtype, seed=7)
    return hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(loss_type="ipo", beta=0.3),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        dict(loss_type="robust", label_smoothing=0.1, average_log_prob=True),
    ],
    ids=["sigmoid", "ipo", "sigmoid+sft", "robust-avg"],
)
def test_fused_linear_dpo_loss_matches_dpo_loss_on_logits(backend, options):
    hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias = _dpo_inputs()
    x = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    out = FusedLinearDPOLoss(backend=backend, **options)(
        x[0], x[1], labels, bias=x[2], ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias
    )
    out.loss.backward()
    y = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    expected = DPOLoss(backend=backend, **options)(
        y[0] @ y[1].T + y[2], labels, ref_hidden @ ref_weight.T + ref_bias
    )
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
    for key, value in expected.metrics().items():
        assert out.metrics()[key] == pytest.approx(value, abs=1e-4, rel=1e-4), key
    for got, want in zip(x, y):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)


def test_fused_linear_reference_options():
    hidden, weight, bias, labels, ref_hidden, _, _ = _dpo_inputs()
    loss = FusedLinearDPOLoss()
    shared_head = loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    ref_logps = linear_sequence_logps(ref_hidden, weight, labels, bias=bias)
    precomputed = loss(hidden, weight, labels, bias=bias, ref_logps=ref_logps)
    torch.testing.assert_close(shared_head.loss, precomputed.loss)
    free = FusedLinearDPOLoss(reference_free=True)(hidden, weight, labels, bias=bias)
    assert (free.ref_chosen_logps == 0).all()
    with pytest.raises(ValueError, match="exactly one reference"):
        loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="exactly one reference"):
        loss(hidden, weight, labels, ref_hidden=ref_hidden, ref_logps=ref_logps)
    with pytest.raises(ValueError, match="need ref_hidden"):
        loss(hidden, weight, labels, ref_logps=ref_logps, ref_weight=weight)
    with pytest.raises(ValueError, match="even size"):
        loss(hidden[:5], weight, labels[:5], ref_logps=ref_logps[:5])


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.update(hidden=a["hidden"][0]), ValueError, r"hidden must be \[N, T, H\]"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, r"weight must be \[V, H\]"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must be \[V\]"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "bfloat16 or float16"),
        (lambda a: a.update(weight=a["weight"].bfloat16()), TypeError, "share one dtype"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "integer"),
        (lambda a: a.update(labels=a["labels"][:, :-1]), ValueError, "does not match hidden"),
        (lambda a: a["labels"].__setitem__((0, 3), 41), ValueError, r"label 41 is outside \[0, 41\)"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "unknown backend"),
        (lambda a: a.update(hidden=a["hidden"].to("meta")), ValueError, "hidden is a meta tensor"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight is a meta tensor"),
        (lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias is a meta tensor"),
        (lambda a: a.update(labels=a["labels"].to("meta")), ValueError, "labels are on meta but hidden"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, error, match):
    hidden, weight, bias, labels = make_linear(4, 6, 8, 41, ignore_frac=0.0)
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, backend="auto")
    mutate(args)
    with pytest.raises(error, match=match):
        linear_sequence_logps(
            args["hidden"], args["weight"], args["labels"], bias=args["bias"], backend=args["backend"]
        )


def test_autocast_region_does_not_change_the_result():
    """Under CPU bfloat16 autocast (as a trainer runs its model) the tiles keep float32 math."""
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37)
    plain, grads, _, _ = _run("auto", hidden, weight, bias, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, grads_under, _, _ = _run("auto", hidden, weight, bias, labels)
    torch.testing.assert_close(under.token_logps, plain.token_logps, atol=0, rtol=0)
    for a, b in zip(grads_under, grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_tile_plan_stays_within_the_memory_budget():
    from fastdpo.backends.linear_tiles import CPU_TILES, TILE_BUDGET, plan_tiles, working_bytes

    cpu = torch.device("cpu")
    logits = 4 * 1024 * 128256 * 4  # float32 logits of 2 pairs x 1024 tokens, Llama-3 vocabulary
    plan = plan_tiles(cpu, torch.float32, 2048, logits)
    assert (plan.row_tile, plan.vocab_tile) == CPU_TILES[0] and plan.operand_dtype == torch.float32
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        for vocab in (32000, 128256):
            budget = TILE_BUDGET * 4 * 1024 * vocab * size
            plan = plan_tiles(cpu, dtype, 2048, budget / TILE_BUDGET)
            chosen = working_bytes(plan.row_tile, plan.vocab_tile, 2048, dtype)
            assert chosen <= budget or (plan.row_tile, plan.vocab_tile) == CPU_TILES[-1]
    assert plan_tiles(cpu, torch.bfloat16, 2048, 10, row_tile=7).row_tile == 7  # explicit wins
