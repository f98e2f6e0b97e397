"""Every backend against the float64 ground truth and the reference: forward and gradient."""

import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    GRAD_TOL,
    LOGP_ATOL,
    assert_close_verbose,
    ground_truth_grad,
    ground_truth_token_logps,
    make_inputs,
)

from fastdpo import fused_logps, sequence_logps
from fastdpo.naive import naive_mean_logit_sums, naive_sequence_logps, naive_token_logps

# (N, T, V): odd vocabularies, T of 1 and 2, a batch of one pair, a vocabulary past one SIMD block.
SHAPES = [(2, 5, 7), (4, 9, 130), (2, 2, 33), (6, 13, 1000), (2, 4, 4099)]


def _check_forward_and_grad(backend, logits, labels, *, ignore_index=-100, shift=True):
    dtype = logits.dtype
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, ignore_index=ignore_index, shift=shift, backend=backend)
    exact = ground_truth_token_logps(logits, labels, ignore_index=ignore_index, shift=shift)
    t = exact.shape[1]
    assert out.token_logps.dtype == torch.float32
    # assert_close_verbose compares err.max() > atol, which a NaN never is: rule NaN out first.
    assert torch.isfinite(out.token_logps).all() and torch.isfinite(out.sequence_logps).all()
    assert_close_verbose(out.token_logps, exact, atol=LOGP_ATOL[dtype], what="token_logps")
    assert_close_verbose(out.sequence_logps, exact.sum(-1), atol=LOGP_ATOL[dtype] * t, what="sequence_logps")
    ref_sums = naive_mean_logit_sums(logits, labels, ignore_index=ignore_index, shift=shift)
    assert_close_verbose(
        out.logit_sums, ref_sums, atol=1e-3 * logits.shape[-1] * t, rtol=1e-5, what="logit_sums"
    )
    # Gradient through both outputs at once, with distinct upstream weights.
    gen = torch.Generator().manual_seed(1)
    w_tok = torch.randn(out.token_logps.shape, generator=gen)
    w_seq = torch.randn(out.sequence_logps.shape, generator=gen)
    ((out.token_logps * w_tok).sum() + (out.sequence_logps * w_seq).sum()).backward()
    expected = ground_truth_grad(
        logits, labels, w_tok + w_seq[:, None], ignore_index=ignore_index, shift=shift
    )
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    rtol, atol = GRAD_TOL[dtype]
    assert_close_verbose(x.grad, expected, atol=atol, rtol=rtol, what="grad")
    return x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shift", [True, False])
def test_parity(backend, dtype, shape, shift):
    logits, labels = make_inputs(*shape, dtype)
    _check_forward_and_grad(backend, logits, labels, shift=shift)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_t_equal_one_without_shift(backend, dtype):
    logits, labels = make_inputs(2, 1, 11, dtype, ignore_frac=0.0)
    _check_forward_and_grad(backend, logits, labels, shift=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_other_ignore_index(backend, ignore_index):
    logits, labels = make_inputs(4, 8, 17, ignore_index=ignore_index)
    labels[0, 2] = 3  # with ignore_index=3 a label equal to 3 is ignored, not scored
    _check_forward_and_grad(backend, logits, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored_rows_give_zero_and_zero_grad(backend, dtype):
    logits, labels = make_inputs(4, 6, 19, dtype)
    labels[1] = -100
    labels[2, 1:] = -100  # only the first label, which the shift never scores
    x = logits.clone().requires_grad_(True)
    seq = sequence_logps(x, labels, backend=backend, average=True)
    assert torch.isfinite(seq).all()
    assert seq[1] == 0 and seq[2] == 0
    seq.sum().backward()
    assert torch.isfinite(x.grad.float()).all()
    assert (x.grad[1] == 0).all() and (x.grad[2] == 0).all()
    # the last position of every row scores nothing under the shift: zero gradient there too
    assert (x.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_ignored(backend):
    logits, labels = make_inputs(2, 5, 9)
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend=backend)
    assert (out.token_logps == 0).all() and (out.sequence_logps == 0).all() and (out.counts == 0).all()
    out.sequence_logps.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_view_logits(backend, dtype):
    """Logits that are a view (padded vocabulary, every other time step): the kernel reads the
    view in place and the gradient lands in the right places of the base tensor."""
    big, _ = make_inputs(4, 14, 40, dtype)
    base = big.clone().requires_grad_(True)
    view = base[:, ::2, :37]  # row stride 80, vocabulary 37 of 40
    assert not view.is_contiguous() and view.stride(-1) == 1
    _, labels = make_inputs(4, 7, 37, seed=5)
    out = fused_logps(view, labels, backend=backend)
    logits = view.detach().contiguous()
    exact = ground_truth_token_logps(logits, labels)
    assert_close_verbose(out.token_logps, exact, atol=LOGP_ATOL[dtype], what="token_logps")
    w = torch.randn(out.token_logps.shape, generator=torch.Generator().manual_seed(2))
    (out.token_logps * w).sum().backward()
    rtol, atol = GRAD_TOL[dtype]
    assert_close_verbose(
        base.grad[:, ::2, :37], ground_truth_grad(logits, labels, w), atol=atol, rtol=rtol, what="grad"
    )
    untouched = torch.ones_like(base.grad, dtype=torch.bool)
    untouched[:, ::2, :37] = False
    assert (base.grad[untouched] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_through_view_lands_in_base(backend):
    base = torch.randn(2, 6, 24, requires_grad=True)
    labels = torch.randint(0, 20, (2, 3))
    seq = sequence_logps(base[:, ::2, :20], labels, backend=backend)
    seq.sum().backward()
    ref = base.detach().clone().requires_grad_(True)
    naive_sequence_logps(ref[:, ::2, :20], labels).sum().backward()
    torch.testing.assert_close(base.grad, ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_implementation(backend, dtype):
    """The backend is at least as close to float64 as the plain reference path is."""
    logits, labels = make_inputs(4, 16, 257, dtype)
    exact = ground_truth_token_logps(logits, labels).sum(-1)
    ours = sequence_logps(logits, labels, backend=backend)
    ref = naive_sequence_logps(logits, labels)
    torch.testing.assert_close(ours, ref, atol=LOGP_ATOL[dtype] * 16, rtol=0)
    assert (ours.double() - exact).abs().max() <= (ref.double() - exact).abs().max() + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_average(backend):
    logits, labels = make_inputs(4, 10, 23)
    labels[3] = -100
    ours = sequence_logps(logits, labels, average=True, backend=backend)
    ref = naive_sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours[3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """Online/stable log-sum-exp: logits of +-1e4 in float32 neither overflow nor NaN."""
    logits, labels = make_inputs(2, 4, 50, scale=1e4)
    x = logits.clone().requires_grad_(True)
    out = sequence_logps(x, labels, backend=backend)
    exact = ground_truth_token_logps(logits, labels).sum(-1)
    torch.testing.assert_close(out.double(), exact, atol=1e-1, rtol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [1e20, 3e38])
def test_gradients_at_huge_logits(backend, dtype, offset):
    """Logits near the largest float32 / bfloat16 values are legal. Spaced by offset / 128, far
    beyond exp's range, every row's softmax is one-hot at its unique maximum (ties below it), so
    the token log-probs are the label's gap to the max and the gradient is g (onehot - that)."""
    gen = torch.Generator().manual_seed(29)
    n, t, v = 2, 6, 300
    steps = torch.randint(1, 60, (n, t, v), generator=gen, dtype=torch.float64)
    steps.view(-1, v)[torch.arange(n * t), torch.randint(0, v, (n * t,), generator=gen)] = 0
    logits = (offset * (1 - steps / 128)).to(dtype)
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[:, 1::2] = steps[:, :-1].argmin(-1)[:, ::2]  # every other label is the max
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend=backend)
    wide = logits.double()[:, :-1]
    picked = wide.gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.token_logps.double(), picked - wide.amax(-1), rtol=1e-6, atol=0)
    w = torch.randn(out.token_logps.shape, generator=gen)
    (out.token_logps * w).sum().backward()
    expected = ground_truth_grad(logits, labels, w)
    assert torch.isfinite(x.grad).all()
    rtol, atol = GRAD_TOL[dtype]  # bfloat16: the gradient's own rounding
    assert_close_verbose(x.grad, expected, atol=atol, rtol=rtol, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nan_or_inf_logit_gives_nan_where_log_softmax_does(backend, dtype, value):
    """One NaN or +inf logit (vocabulary 2100: past a 2048-element block) makes its row's token
    log-prob and gradient NaN, as in the float32 log_softmax reference, and leaves every other
    row exact; a row that scores nothing (ignored) stays 0 with a zero gradient."""
    logits, labels = make_inputs(2, 5, 2100, dtype=dtype)
    logits[0, 1, 2077] = value  # scores labels[0, 2]
    logits[1, 3, 5] = value
    labels[1, 4] = -100  # so row [1, 3] scores nothing
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend=backend)
    reference = naive_token_logps(logits, labels)
    assert torch.equal(out.token_logps.isnan(), reference.isnan()) and reference.isnan().sum() == 1
    exact = ground_truth_token_logps(logits, labels)
    finite = ~reference.isnan()
    assert_close_verbose(out.token_logps[finite], exact[finite], atol=LOGP_ATOL[dtype], what="token_logps")
    out.token_logps.sum().backward()
    assert x.grad[0, 1].isnan().all()
    assert torch.equal(x.grad[1, 3], torch.zeros_like(x.grad[1, 3]))  # ignored: never read
    rest = torch.ones(2, 5, dtype=torch.bool)
    rest[0, 1] = rest[1, 3] = False
    expected = ground_truth_grad(logits.masked_fill(~rest[..., None], 0), labels, torch.ones(2, 4))
    rtol, atol = GRAD_TOL[dtype]
    assert_close_verbose(x.grad[rest], expected[rest], atol=atol, rtol=rtol, what="grad")


def test_reference_is_the_float32_log_softmax_path():
    logits, labels = make_inputs(2, 6, 13)
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(
        -1, labels[:, 1:].clamp(min=0)[..., None]
    )[..., 0]
    expected = expected * (labels[:, 1:] != -100)
    torch.testing.assert_close(naive_token_logps(logits, labels), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_never_read(backend):
    """Rows whose label is ignored may hold anything, NaN included: skipped, not computed and masked."""
    logits, labels = make_inputs(2, 6, 9)
    labels[0, 3] = -100
    logits[0, 2] = float("nan")  # row 2 scores labels[0, 3], which is ignored
    logits[1, -1] = float("nan")  # the last row scores nothing under the shift
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend=backend)
    (out.sequence_logps.sum() + out.token_logps.sum()).backward()
    assert torch.isfinite(out.sequence_logps).all() and torch.isfinite(out.token_logps).all()
    assert torch.isfinite(out.logit_sums).all() and torch.isfinite(x.grad).all()


# Masked vocabularies: -inf over whole blocks of the kernels (the native kernel reads a row in
# blocks of 2048 entries, Triton in blocks of 4096), so an online log-sum-exp sees a running max
# of -inf for a while. Every label scores an allowed entry: the answer is finite.
MASKED_VOCAB = 9000
MASKS = {
    "leading": slice(0, 5000),  # the first blocks of both kernels
    "trailing": slice(MASKED_VOCAB - 5000, MASKED_VOCAB),
    "interior": slice(2000, 7000),
    "all-but-one": [i for i in range(MASKED_VOCAB) if i != 6000],
}


def masked_inputs(mask: str, dtype, vocab=MASKED_VOCAB, n=2, t=5, seed=3):
    logits, labels = make_inputs(n, t, vocab, dtype, seed=seed)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[MASKS[mask]] = False
    logits[..., ~allowed] = -torch.inf
    choices = allowed.nonzero().squeeze(1)
    counted = labels != -100
    pick = torch.randint(len(choices), (int(counted.sum()),), generator=torch.Generator().manual_seed(seed))
    labels[counted] = choices[pick]
    return logits, labels


def masked_ground_truth(logits, labels, grad_tokens):
    """float64 token log-probs, logit sums and the gradient of sum(grad_tokens * token_logps);
    ignored positions are selected away, not multiplied by 0 (their -inf would give NaN)."""
    x = logits.detach().double().requires_grad_(True)
    target = labels[:, 1:]
    mask = target != -100
    logps = torch.log_softmax(x[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    tokens = torch.where(mask, logps, 0.0)
    (tokens * grad_tokens.double()).sum().backward()
    logit_sums = torch.where(mask, x[:, :-1].detach().sum(-1), 0.0).sum(-1)
    return tokens.detach(), logit_sums, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_masked_vocabulary(backend, dtype, mask):
    logits, labels = masked_inputs(mask, dtype)
    x = logits.clone().requires_grad_(True)
    out = fused_logps(x, labels, backend=backend)
    w = torch.randn(out.token_logps.shape, generator=torch.Generator().manual_seed(1))
    (out.token_logps * w).sum().backward()
    tokens, logit_sums, grad = masked_ground_truth(logits, labels, w)
    # assert_close_verbose compares err.max() > atol, which a NaN never is: rule NaN out first.
    assert torch.isfinite(out.token_logps).all() and torch.isfinite(x.grad).all()
    assert_close_verbose(out.token_logps, tokens, atol=LOGP_ATOL[dtype], what="token_logps")
    assert_close_verbose(out.sequence_logps, tokens.sum(-1), atol=LOGP_ATOL[dtype] * 4, what="sequence_logps")
    torch.testing.assert_close(out.logit_sums.double(), logit_sums, atol=1e-2, rtol=1e-5)  # -inf where masked
    rtol, atol = GRAD_TOL[dtype]
    assert_close_verbose(x.grad, grad, atol=atol, rtol=rtol, what="grad")


@pytest.mark.parametrize("mask", MASKS)
def test_the_oracle_on_masked_vocabularies(mask):
    """The naive oracle selects ignored rows away: a masked row sums to -inf and an all -inf row's
    log_softmax is NaN, and either times a 0 mask is NaN."""
    logits, labels = masked_inputs(mask, torch.float32)
    ignored = (labels[:, 1:] == -100).nonzero()[0]
    logits[ignored[0], ignored[1]] = -torch.inf  # an ignored row that allows nothing
    tokens, logit_sums, _ = masked_ground_truth(logits, labels, torch.zeros(labels[:, 1:].shape))
    torch.testing.assert_close(naive_token_logps(logits, labels).double(), tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        naive_mean_logit_sums(logits, labels).double(), logit_sums, atol=1e-2, rtol=1e-5
    )


# In-place backward: the gradient overwrites the logits, so autograd must know (version counter)
# and the logits must not alias themselves.


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_twice_is_autograds_error(backend):
    logits, labels = make_inputs(2, 5, 11)
    x = logits.clone().requires_grad_(True) * 1.0  # not a leaf: its storage may be overwritten
    loss = fused_logps(x, labels, backend=backend, inplace_backward=True).sequence_logps.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the saved logits now hold the gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_under_an_op_that_saved_the_logits_is_autograds_error(backend):
    logits, labels = make_inputs(2, 5, 11)
    x = logits.clone().requires_grad_(True) * 1.0
    squares = (x**2).sum()  # recorded first, so its backward runs after the in-place one
    loss = fused_logps(x, labels, backend=backend, inplace_backward=True).sequence_logps.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares).backward()


# Layouts whose elements share memory: an expand()ed batch, rows that overlap.
OVERLAPPING = {
    "expanded": ((1, 5, 11), lambda leaf: leaf.expand(3, 5, 11)),
    "overlapping rows": ((100,), lambda leaf: leaf.as_strided((2, 5, 11), (20, 3, 1))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", OVERLAPPING)
def test_inplace_backward_refuses_logits_that_overlap_themselves(backend, layout):
    shape, make_view = OVERLAPPING[layout]
    data = torch.randn(shape)
    leaf = data.clone().requires_grad_(True)
    logits = make_view(leaf)
    labels = make_inputs(logits.shape[0], 5, 11)[1]
    with pytest.raises(ValueError, match=r"inplace_backward=True .*logits.* overlap"):
        fused_logps(logits, labels, backend=backend, inplace_backward=True)
    # Out of place the same logits are fine: autograd sums the gradient over aliased elements.
    fused_logps(logits, labels, backend=backend).sequence_logps.sum().backward()
    ref = data.clone().requires_grad_(True)
    naive_sequence_logps(make_view(ref), labels).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_on_a_strided_view_writes_only_the_view(backend):
    base = torch.randn(3, 10, 40)
    labels = make_inputs(3, 5, 33, seed=3)[1]
    before = base.clone()
    x = base.clone().requires_grad_(True) * 1.0
    view = x[:, ::2, :33]  # strided, not overlapping: allowed in place
    fused_logps(view, labels, backend=backend, inplace_backward=True).sequence_logps.sum().backward()
    expected = ground_truth_grad(before[:, ::2, :33], labels, torch.ones(3, 4))
    assert_close_verbose(x.detach()[:, ::2, :33], expected, atol=1e-6, rtol=1e-5, what="grad in place")
    untouched = torch.ones(base.shape, dtype=torch.bool)
    untouched[:, ::2, :33] = False
    assert torch.equal(x.detach()[untouched], before[untouched])


def test_meta_and_misplaced_tensors_are_errors_that_name_the_argument():
    labels = make_inputs(2, 5, 11)[1]
    with pytest.raises(ValueError, match="logits is a meta tensor"):
        fused_logps(torch.empty(2, 5, 11, device="meta"), labels.to("meta"))
    with pytest.raises(ValueError, match="labels are on meta but logits are on cpu"):
        fused_logps(torch.randn(2, 5, 11), labels.to("meta"))


def test_the_comparison_helper_fails_on_nan_and_unexpected_infinities():
    # Every parity test goes through this helper: a NaN output must not slip through it.
    nan, inf = float("nan"), float("inf")
    for actual, expected in [([nan], [0.0]), ([inf], [1.0]), ([1.0], [inf]), ([1.0, 2.0], [1.0])]:
        with pytest.raises(AssertionError):
            assert_close_verbose(torch.tensor(actual), torch.tensor(expected), atol=1e-3, what="x")
    assert_close_verbose(torch.tensor([-inf, nan, 1.0]), torch.tensor([-inf, nan, 1.0]), atol=0.0, what="x")
