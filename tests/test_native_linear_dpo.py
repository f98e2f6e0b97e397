"""FusedLinearDPOLoss without the logits recompute (fastdpo/linear_dpo.py): the loss and the
gradients of hidden states, head and bias made in the forward by chunks of pairs, against
float64 and against the recompute path; chunking, budget, fall-backs, scaling, double backward."""

import pytest
import torch
from helpers import GRAD_TOL, assert_close_verbose
from test_linear import make_linear

from fastdpo import FusedLinearDPOLoss
from fastdpo.backends import native_linear
from fastdpo.functional import preference_loss
from fastdpo.linear_dpo import budget_bytes, chunk_pairs, kept_dtype, plan_chunks

OPTIONS = {
    "sigmoid": dict(),
    "ipo": dict(loss_type="ipo", beta=0.3),
    "robust-avg": dict(loss_type="robust", label_smoothing=0.1, average_log_prob=True),
    "hinge+simpo": dict(loss_type=["hinge", "simpo"], loss_weights=[1.0, 0.5]),
    "sigmoid-js": dict(f_divergence_type="js_divergence"),
}


@pytest.fixture(params=["auto", "float32"])
def operands(request, monkeypatch):
    monkeypatch.setenv(native_linear.OPERANDS_ENV, request.param)
    return request.param


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Row tiles of 4 rows and vocabulary blocks of 16, so that these small batches have many
    tiles and a budget can keep some row tiles and recompute the others."""
    monkeypatch.setattr(native_linear, "ROW_TILE", 4)
    monkeypatch.setattr(native_linear, "VOCAB_TILE", 16)


def _row_bytes(dtype, h, v):
    """What one kept row takes: its tiles in the kept dtype and a float32 maximum per block."""
    plan = native_linear.plan_tiles(dtype, h)
    return kept_dtype(plan).itemsize * v + 4 * -(-v // plan.vocab_tile)


def _budgets(dtype, h=16, v=53):
    """memory_budget_mib of each way to run: all rows kept, 12 rows kept (three tiles; the rest
    recomputed in the same chunk), and 0 (the recompute path)."""
    return {"all": 64.0, "part": 12 * _row_bytes(dtype, h, v) / 2**20, "recompute": 0.0}


def _inputs(pairs=3, t=9, h=16, v=53, dtype=torch.float32, bias=True):
    hidden, weight, b, labels = make_linear(2 * pairs, t, h, v, dtype, bias=bias)
    ref_hidden = make_linear(2 * pairs, t, h, v, dtype, seed=7)[0]
    return hidden, weight, b, labels, ref_hidden


def _run(loss_fn, hidden, weight, bias, labels, ref_hidden, scale=1.0):
    x = [None if z is None else z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    out = loss_fn(x[0], x[1], labels, bias=x[2], ref_hidden=ref_hidden)
    (out.loss * scale).backward()
    return out, [None if z is None else z.grad for z in x]


def _float64(options, hidden, weight, bias, labels, ref_hidden):
    """float64 loss and gradients of the same DPO loss on hidden @ weight.T + bias."""
    x = [None if z is None else z.detach().double().requires_grad_(True) for z in (hidden, weight, bias)]

    def logps(h, w, b):
        logits = (h @ w.T + (0 if b is None else b))[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        tok = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        seq, counts = tok.sum(-1), mask.sum(-1)
        return (seq / counts.clamp(min=1) if options.get("average_log_prob") else seq), counts

    pi, counts = logps(*x)
    with torch.no_grad():
        ref, _ = logps(ref_hidden.double(), x[1], x[2])
    k = pi.shape[0] // 2
    opts = {key: val for key, val in options.items() if key != "average_log_prob"}
    n = (None, None) if options.get("average_log_prob") else (counts[:k], counts[k:])
    losses, _, _ = preference_loss(
        pi[:k], pi[k:], ref[:k], ref[k:], chosen_counts=n[0], rejected_counts=n[1], **opts
    )
    losses.mean().backward()
    return losses.mean(), [None if z is None else z.grad for z in x]


@pytest.mark.parametrize("kept", ["all", "part"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_and_gradients_match_float64(operands, dtype, name, kept):
    hidden, weight, bias, labels, ref_hidden = _inputs(dtype=dtype)
    loss_fn = FusedLinearDPOLoss(backend="native", memory_budget_mib=_budgets(dtype)[kept], **OPTIONS[name])
    out, grads = _run(loss_fn, hidden, weight, bias, labels, ref_hidden)
    assert type(out.loss.grad_fn).__name__ == "_LossInForwardBackward"  # no recompute here
    exact, exact_grads = _float64(OPTIONS[name], hidden, weight, bias, labels, ref_hidden)
    assert_close_verbose(out.loss, exact, atol=2e-5, rtol=1e-5, what="loss")
    rtol, atol = GRAD_TOL[dtype]
    for what, got, want in zip(("hidden", "weight", "bias"), grads, exact_grads):
        assert got.dtype == dtype, what
        # bfloat16/float16: the float32 gradient is rounded once, but the loss's own float32
        # rounding (log-probs of ~1e1 in float32) shows in gradients of ~1e-3: atol 2x.
        assert_close_verbose(got, want, atol=2 * atol, rtol=rtol, what=f"grad {what}")


@pytest.mark.parametrize("kept", ["all", "part"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h", [1100, 1031])
def test_hidden_size_over_one_gemm_slice(operands, dtype, h, kept):
    """GEMMs cut K = H in slices of 512 (fused_linear.h kGemmSlice): 512, 512 and a remainder,
    even (bfloat16 operands) and odd (float32 operands). The head is scaled by h^-1/2 so that the
    logits stay O(1), as a trained head's do."""
    pairs, t, v = 2, 5, 37
    hidden, weight, bias, labels = make_linear(2 * pairs, t, h, v, dtype, weight_scale=h**-0.5)
    ref_hidden = make_linear(2 * pairs, t, h, v, dtype, seed=7)[0]
    budget = {"all": 64.0, "part": 4 * _row_bytes(dtype, h, v) / 2**20}[kept]
    out, grads = _run(
        FusedLinearDPOLoss(backend="native", memory_budget_mib=budget),
        hidden,
        weight,
        bias,
        labels,
        ref_hidden,
    )
    assert type(out.loss.grad_fn).__name__ == "_LossInForwardBackward"
    exact, exact_grads = _float64({}, hidden, weight, bias, labels, ref_hidden)
    assert_close_verbose(out.loss, exact, atol=2e-5, rtol=1e-5, what="loss")
    rtol, atol = GRAD_TOL[dtype]
    for what, got, want in zip(("hidden", "weight", "bias"), grads, exact_grads):
        assert_close_verbose(got, want, atol=2 * atol, rtol=rtol, what=f"grad {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_chunks_of_one_pair_and_recompute_agree(operands, dtype, bias):
    """A budget that holds one pair at a time (three chunks; a bfloat16 head then accumulates its
    gradient in float32), one that keeps some rows of one chunk, and one chunk keeping every
    row, against the recompute path (budget 0)."""
    hidden, weight, b, labels, ref_hidden = _inputs(dtype=dtype, bias=bias, v=301, h=32)
    per_pair = 2 * 8 * _row_bytes(dtype, 32, 301)  # at most 16 rows
    accumulator = 0 if dtype == torch.float32 else 301 * 32 * 4
    budgets = {"one-pair": (per_pair + accumulator) / 2**20, **_budgets(dtype, 32, 301)}
    results = {
        k: _run(
            FusedLinearDPOLoss(backend="native", memory_budget_mib=m), hidden, weight, b, labels, ref_hidden
        )
        for k, m in budgets.items()
    }
    names = {k: type(out.loss.grad_fn).__name__ for k, (out, _) in results.items()}
    assert (
        names["one-pair"] == names["part"] == names["all"] == "_LossInForwardBackward" != names["recompute"]
    )
    rtol, atol = GRAD_TOL[dtype]
    base, base_grads = results["recompute"]
    for key in ("one-pair", "part", "all"):
        out, grads = results[key]
        torch.testing.assert_close(out.loss, base.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.policy_chosen_logps, base.policy_chosen_logps, atol=1e-4, rtol=1e-5)
        assert out.metrics() == pytest.approx(base.metrics(), rel=1e-4, abs=1e-4)
        for got, want in zip(grads, base_grads):
            if want is not None:
                torch.testing.assert_close(got.float(), want.float(), atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_leading_vocabulary_with_very_negative_logits(operands, dtype):
    """A -inf bias on the first vocabulary blocks and every other logit near -1e4 (legal input):
    the blocks folded while a row's max was -inf must add nothing, not exp(0 - lse) = inf times
    their zeros (NaN gradients, as the chunk path once gave); all kept, some, and recomputed."""
    hidden, weight, bias, labels, _ = _inputs(dtype=dtype)
    bias = bias.float() - 1e4
    bias[:20] = float("-inf")
    bias = bias.to(dtype)
    labels = torch.where(labels >= 0, labels.clamp(min=20), labels)
    results = {
        k: _run(FusedLinearDPOLoss(backend="native", memory_budget_mib=m, reference_free=True),
                hidden, weight, bias, labels, None)
        for k, m in _budgets(dtype).items()
    }  # fmt: skip
    base, base_grads = results.pop("recompute")
    for out, grads in results.values():
        assert type(out.loss.grad_fn).__name__ == "_LossInForwardBackward"
        torch.testing.assert_close(out.loss, base.loss)
        for got, want in zip(grads, base_grads):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=2e-2)


def test_chunk_pairs_plan():
    assert chunk_pairs([3, 3, 3], 10, 90, 1000) == [(0, 3)]  # all fit: no accumulator needed
    assert chunk_pairs([3, 3, 3], 10, 60, 0) == [(0, 2), (2, 3)]
    assert chunk_pairs([3, 5, 2, 2], 10, 50, 0) == [(0, 1), (1, 2), (2, 4)]
    assert chunk_pairs([3, 3, 3], 10, 60, 20) == [(0, 1), (1, 2), (2, 3)]  # the accumulator is charged
    assert chunk_pairs([3, 7, 3], 10, 60, 0) is None  # one pair does not fit: recompute
    assert plan_chunks([3, 3, 3], 10, 60, 0, 2) == ([(0, 2), (2, 3)], None)  # whole pairs when they fit
    assert plan_chunks([3, 7, 3], 10, 60, 0, 2) == ([(0, 3)], 6)  # else one chunk, 3 tiles of 2 rows kept
    assert plan_chunks([3, 7, 3], 10, 65, 0, 4) == ([(0, 3)], 4)  # whole tiles only
    assert plan_chunks([3, 7, 3], 10, 35, 0, 4) is None  # not one tile: the recompute path


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair", "sft", ["sigmoid", "sft"]], ids=str)
def test_batch_losses_take_the_recompute_path(loss_type):
    hidden, weight, bias, labels, ref_hidden = _inputs()
    out, _ = _run(
        FusedLinearDPOLoss(backend="native", loss_type=loss_type), hidden, weight, bias, labels, ref_hidden
    )
    assert type(out.loss.grad_fn).__name__ != "_LossInForwardBackward"


def test_other_backends_and_no_grad_take_the_usual_path():
    hidden, weight, bias, labels, ref_hidden = _inputs()
    out, _ = _run(FusedLinearDPOLoss(backend="torch"), hidden, weight, bias, labels, ref_hidden)
    assert type(out.loss.grad_fn).__name__ != "_LossInForwardBackward"
    with torch.no_grad():
        plain = FusedLinearDPOLoss(backend="native")(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    assert plain.loss.grad_fn is None
    torch.testing.assert_close(plain.loss, out.loss.detach(), atol=1e-6, rtol=1e-6)


def test_upstream_scale_and_log_probs_used_beyond_the_loss():
    """The loss's upstream gradient scales the stored gradients; a gradient through the policy
    log-probs as well (an extra term) is added by the recompute path."""
    hidden, weight, bias, labels, ref_hidden = _inputs()
    grads = {}
    for budget in (64.0, 0.0):
        loss_fn = FusedLinearDPOLoss(backend="native", memory_budget_mib=budget)
        x = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
        out = loss_fn(x[0], x[1], labels, bias=x[2], ref_hidden=ref_hidden)
        (0.25 * out.loss - 0.01 * out.policy_chosen_logps.sum()).backward()
        grads[budget] = [z.grad for z in x]
    for got, want in zip(grads[64.0], grads[0.0]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_second_backward_and_bad_budget_are_clear_errors():
    hidden, weight, bias, labels, ref_hidden = _inputs()
    x = hidden.clone().requires_grad_(True)
    out = FusedLinearDPOLoss(backend="native")(x, weight, labels, bias=bias, ref_hidden=ref_hidden)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        out.loss.backward()
    with pytest.raises(ValueError, match="memory_budget_mib must be >= 0, got -1"):
        FusedLinearDPOLoss(memory_budget_mib=-1)


def test_bad_input_is_the_usual_clear_error():
    hidden, weight, bias, labels, ref_hidden = _inputs()
    labels[0, 3] = 53
    with pytest.raises(ValueError, match=r"label 53 is outside \[0, 53\)"):
        _run(FusedLinearDPOLoss(backend="native"), hidden, weight, bias, labels, ref_hidden)
    with pytest.raises(TypeError, match="share one dtype"):
        _run(FusedLinearDPOLoss(backend="native"), hidden, weight.bfloat16(), None, labels, ref_hidden)


def test_precomputed_reference_and_reference_free():
    hidden, weight, bias, labels, ref_hidden = _inputs()
    loss_fn = FusedLinearDPOLoss(backend="native")
    shared, _ = _run(loss_fn, hidden, weight, bias, labels, ref_hidden)
    ref_logps = torch.cat([shared.ref_chosen_logps, shared.ref_rejected_logps])
    x = hidden.clone().requires_grad_(True)
    pre = loss_fn(x, weight, labels, bias=bias, ref_logps=ref_logps)
    assert type(pre.loss.grad_fn).__name__ == "_LossInForwardBackward"
    torch.testing.assert_close(pre.loss, shared.loss)
    free = FusedLinearDPOLoss(backend="native", reference_free=True)(x, weight, labels, bias=bias)
    assert (free.ref_chosen_logps == 0).all() and type(free.loss.grad_fn).__name__ == "_LossInForwardBackward"


def test_default_budget_is_a_quarter_of_the_float32_logits_of_the_batch():
    hidden, weight, bias, labels, ref_hidden = _inputs()
    n, t, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    assert FusedLinearDPOLoss().memory_budget_mib is None
    assert budget_bytes(None, hidden, v) == n * t * v
    assert budget_bytes(1.5, hidden, v) == int(1.5 * 2**20)
    # 6 x 9 x 53 bytes keep 12 rows of 53 float32 and 4 block maxima (228 bytes each): rows past them
    # are recomputed within the chunk.
    out, _ = _run(FusedLinearDPOLoss(backend="native"), hidden, weight, bias, labels, ref_hidden)
    assert type(out.loss.grad_fn).__name__ == "_LossInForwardBackward"
