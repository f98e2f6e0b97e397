"""Specifics of the native C++ backend: op registration, gradcheck, determinism, bounds, in place."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import GRAD_TOL, make_inputs

from fastdpo import fused_logps, sequence_logps
from fastdpo.backends import native

native.load()
ops = torch.ops.fastdpo


def _op_args(n=3, t=6, v=37, dtype=torch.float32, shift=True):
    logits, labels = make_inputs(n, t, v, dtype)
    return logits, labels, -100, shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shift", [True, False])
def test_opcheck_forward(dtype, shift):
    logits, labels, ignore_index, _ = _op_args(dtype=dtype)
    torch.library.opcheck(ops.logps_forward, (logits, labels, ignore_index, shift))
    if dtype == torch.float32:  # also through the registered autograd
        x = logits.clone().requires_grad_(True)
        torch.library.opcheck(ops.logps_forward, (x, labels, ignore_index, shift))


def test_opcheck_backward_ops():
    logits, labels, ignore_index, shift = _op_args()
    _, lse, _, _ = ops.logps_forward(logits, labels, ignore_index, shift)
    grad_rows = torch.randn(lse.shape)
    torch.library.opcheck(ops.logps_backward, (logits, labels, lse, grad_rows, ignore_index, shift))
    torch.library.opcheck(ops.logps_backward_, (logits.clone(), labels, lse, grad_rows, ignore_index, shift))


@pytest.mark.parametrize("shift", [True, False])
def test_gradcheck_float64(shift):
    logits, labels = make_inputs(2, 5, 11)
    x = logits.double().requires_grad_(True)

    def f(z):
        tok, _lse, seq, _sums = ops.logps_forward(z, labels, -100, shift)
        return tok, seq

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_torch_compile_traces_the_ops():
    logits, labels = make_inputs(2, 7, 19)
    compiled = torch.compile(lambda x, y: sequence_logps(x, y, backend="native"), fullgraph=False)
    torch.testing.assert_close(compiled(logits, labels), sequence_logps(logits, labels, backend="native"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_are_bitwise_identical(dtype):
    logits, labels = make_inputs(4, 33, 3001, dtype)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_(True)
            out = fused_logps(x, labels, backend="native")
            (out.sequence_logps.sum() + out.token_logps.sum()).backward()
            results.append((out.token_logps, out.sequence_logps, out.logit_sums, x.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [37, -1, 10**12])
def test_cpp_rejects_out_of_range_labels_before_reading(bad):
    logits, labels, ignore_index, shift = _op_args()
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=f"label {bad} at \\[1, 3\\] is outside \\[0, 37\\)"):
        ops.logps_forward(logits, labels, ignore_index, shift)
    lse = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="is outside"):
        ops.logps_backward(logits, labels, lse, torch.zeros(3, 5), ignore_index, shift)


def test_cpp_checks_shapes_and_dtypes():
    logits, labels, ignore_index, shift = _op_args()
    with pytest.raises(RuntimeError, match="labels must have shape"):
        ops.logps_forward(logits, labels[:, :-1].contiguous(), ignore_index, shift)
    with pytest.raises(RuntimeError, match="labels must be Long"):
        ops.logps_forward(logits, labels.int(), ignore_index, shift)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.logps_forward(logits.transpose(1, 2).contiguous().transpose(1, 2), labels, ignore_index, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_matches_and_reuses_storage(dtype):
    logits, labels = make_inputs(4, 9, 131, dtype)
    x = logits.clone().requires_grad_(True)
    fused_logps(x, labels, backend="native").sequence_logps.sum().backward()

    y = logits.clone()
    tok, lse, _, _ = native.forward(y, labels, -100, True)
    grad = native.backward(y, labels, lse, torch.ones_like(tok), -100, True, inplace=True)
    assert grad.data_ptr() == y.data_ptr()
    assert torch.equal(grad, x.grad)


def test_inplace_through_dpo_loss():
    """Logits made by an LM head: in-place mode gives the same parameter gradients, and the
    logits' storage ends up holding their gradient (no second [N, T, V] buffer)."""
    from fastdpo import DPOLoss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 16, generator=gen)
    head = torch.randn(131, 16, generator=gen)
    _, labels = make_inputs(4, 9, 131)
    ref = torch.zeros(4)
    grads, logits_after = [], None
    for inplace in (False, True):
        w = head.clone().requires_grad_(True)
        logits = hidden @ w.T
        if not inplace:
            logits.retain_grad()
        DPOLoss(backend="native", inplace_backward=inplace)(logits, labels, ref_logps=ref).loss.backward()
        grads.append(w.grad)
        if inplace:
            logits_after = logits.detach()
        else:
            expected_logits_grad = logits.grad
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(logits_after, expected_logits_grad)


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    from fastdpo import backends

    monkeypatch.setitem(backends._loaded, "native", None)
    monkeypatch.setitem(backends._why_unavailable, "native", "ImportError: fastdpo._C was not built")
    monkeypatch.setattr(backends, "_warned", set())
    logits, labels = make_inputs(2, 5, 11)
    with pytest.warns(
        UserWarning, match=r"native backend is unavailable \(ImportError: fastdpo._C was not built\)"
    ):
        out = sequence_logps(logits, labels)
    torch.testing.assert_close(out, sequence_logps(logits, labels, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sequence_logps(logits, labels)  # warned once, not every call


_STATISTICS_DETERMINISM = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import fastdpo.backends.native
ops = torch.ops.fastdpo
g = torch.Generator().manual_seed(3)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = (torch.randn(4, 67, 4099, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 4099, (4, 67), generator=g)
    labels[torch.rand(4, 67, generator=g) < 0.3] = -100
    digest = hashlib.sha256()
    for t in ops.logps_forward_statistics(logits, labels, -100, True):
        digest.update(t.numpy().tobytes())
    print(dtype, digest.hexdigest())
"""


def test_statistics_bitwise_equal_for_one_and_two_threads():
    """Fresh processes (the thread pool is set before any work): all eight outputs of the
    statistics op hash the same with 1 and 2 threads, in every input dtype."""
    digests = [
        subprocess.run(
            [sys.executable, "-c", _STATISTICS_DETERMINISM, str(threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for threads in (1, 2)
    ]
    assert digests[0].count("torch.") == 3 and digests[0] == digests[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_is_top1_is_the_first_maximum_across_lanes_and_blocks(dtype):
    """Rows of many tied values (bfloat16 rounds logits onto few values) with the maximum planted
    at several places, in different vector lanes and vocabulary blocks (V = 5000 is two full
    2048-element blocks and a tail): the label is the top-1 only at the first of them."""
    gen = torch.Generator().manual_seed(11)
    n, t, v = 2, 40, 5000
    logits = (torch.randint(-20, 20, (n, t, v), generator=gen) / 4).to(dtype)
    labels = torch.empty(n, t, dtype=torch.long)
    for i in range(n):
        for j in range(t):
            places = torch.randperm(v, generator=gen)[: 2 + j % 3]
            logits[i, j, places] = 10.0
            # rows j - 1 score label j: the first maximum on even j, a later one on odd j
            labels[i, (j + 1) % t] = places.min() if j % 2 == 0 else places.max()
    first_max = logits[:, :-1].float().argmax(-1)
    expected = labels[:, 1:] == first_max
    assert 0 < expected.sum() < expected.numel()  # both outcomes occur
    out = ops.logps_forward_statistics(logits, labels, -100, True)
    assert torch.equal(out[6], expected)


def test_statistics_op_checks():
    logits, labels, ignore_index, shift = _op_args(dtype=torch.bfloat16)
    torch.library.opcheck(ops.logps_forward_statistics, (logits, labels, ignore_index, shift))
    with pytest.raises(ValueError, match="is outside"):
        labels[0, 2] = 37
        ops.logps_forward_statistics(logits, labels, ignore_index, shift)


_ISA_OUTPUTS = """
import sys, torch
import fastdpo.backends.native
ops = torch.ops.fastdpo
g = torch.Generator().manual_seed(5)
out = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    logits = (torch.randn(3, 21, 4141, generator=g) * 4).to(dtype)  # 2 blocks and a tail
    logits[0, :, :2100] = -torch.inf  # a masked first block
    logits[1, :, 3000:3100] = -torch.inf
    labels = torch.randint(2100, 4141, (3, 21), generator=g)
    labels[torch.rand(3, 21, generator=g) < 0.3] = -100
    stats = ops.logps_forward_statistics(logits, labels, -100, True)
    grad_rows = torch.randn(stats[1].shape, generator=g)
    grad = ops.logps_backward(logits, labels, stats[1], grad_rows, -100, True)
    out[str(dtype)] = (*stats, grad)
# softmax of -88 against 0: 6e-39, a gradient below bfloat16's normal range
tiny = torch.full((1, 2, 64), -88.0, dtype=torch.bfloat16)
tiny[..., 0] = 0
labels = torch.zeros(1, 2, dtype=torch.long)
lse = ops.logps_forward(tiny, labels, -100, True)[1]
out["subnormal"] = ops.logps_backward(tiny, labels, lse, torch.ones_like(lse), -100, True)
torch.save(out, sys.argv[1])
"""


def _run_with_isa(isa, script, *args):
    """Run a Python script in a fresh process with FASTDPO_NATIVE_ISA=isa (read once per process)."""
    env = dict(os.environ, FASTDPO_NATIVE_ISA=isa)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)


def _isa_outputs(isa, path):
    return _run_with_isa(isa, _ISA_OUTPUTS, str(path))


def _assert_same_up_to_rounding(a, b):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a[str(dtype)], b[str(dtype)]
        for i in (0, 1, 4, 5):  # token_logps, lse, entropy, log_sum_sq_probs
            torch.testing.assert_close(x[i], y[i], atol=2e-5, rtol=0)
        torch.testing.assert_close(x[2], y[2], atol=1e-4, rtol=0)  # sequence sums
        assert torch.equal(x[6], y[6])  # is_top1
        for i in (3, 7):  # logit sums and mean logits: bfloat16 sums in another order on AVX-512
            if dtype == torch.bfloat16:
                torch.testing.assert_close(x[i], y[i], atol=0, rtol=1e-6)
            else:
                assert torch.equal(x[i], y[i]), i
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(x[8], y[8], rtol=rtol, atol=atol)


def test_every_isa_path_matches_the_generic_path(tmp_path):
    """FASTDPO_NATIVE_ISA=generic forces the at::vec-only kernels (what AVX2 and default builds
    run); avx512 and avx512bf16 (where the build and the CPU have them) give the same results up
    to float32 rounding, and the switch does change the kernels. The default path also runs the
    whole parity suite against float64."""
    generic = _isa_outputs("generic", tmp_path / "generic.pt")
    assert generic.returncode == 0, generic.stderr
    base = torch.load(tmp_path / "generic.pt")
    ran = {}
    for isa in ("avx512", "avx512bf16"):
        result = _isa_outputs(isa, tmp_path / f"{isa}.pt")
        if result.returncode != 0:  # refused, with the reason, where the build or CPU lacks it
            assert "built without AVX-512" in result.stderr or "lacks AVX512-BF16" in result.stderr
            continue
        ran[isa] = torch.load(tmp_path / f"{isa}.pt")
        _assert_same_up_to_rounding(base, ran[isa])
        assert not torch.equal(base["torch.float32"][8], ran[isa]["torch.float32"][8])
    if "avx512" in ran:  # bfloat16 rounding keeps subnormals; vcvtne2ps2bf16 flushes them to 0
        assert (ran["avx512"]["subnormal"][0, 0, 1:] != 0).all()
    if "avx512bf16" in ran:
        assert (ran["avx512bf16"]["subnormal"][0, 0, 1:] == 0).all()


def test_bad_isa_choice_is_one_line_error(tmp_path):
    bad = _isa_outputs("sse9", tmp_path / "x.pt")
    assert bad.returncode != 0
    assert "FASTDPO_NATIVE_ISA must be auto, avx512, avx512bf16 or generic, got 'sse9'" in bad.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_gradient_equals_the_cached_one(dtype):
    """A gradient of 64 MB or more is written with non-temporal stores (ignored rows too): the
    same bits as the sequences' gradients computed one at a time (each under 64 MB, written
    through the cache), out of place and in place."""
    v = 32768
    t = (64 * 2**20) // (v * dtype.itemsize) // 2 + 8  # two sequences: just over 64 MB
    logits, labels = make_inputs(2, t, v, dtype)
    _, lse, _, _ = ops.logps_forward(logits, labels, -100, True)
    grad_rows = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1))
    streamed = ops.logps_backward(logits, labels, lse, grad_rows, -100, True)
    assert streamed.nbytes >= 64 * 2**20
    one_at_a_time = torch.cat(
        [
            ops.logps_backward(
                logits[i : i + 1], labels[i : i + 1], lse[i : i + 1], grad_rows[i : i + 1], -100, True
            )
            for i in range(2)
        ]
    )
    assert torch.equal(streamed, one_at_a_time)
    ops.logps_backward_(logits, labels, lse, grad_rows, -100, True)
    assert torch.equal(logits, streamed)


def _sign_pattern_rows(case, v, gen):
    """Four bfloat16 rows of length v (one sequence, no shift) of one kind of value."""
    if case == "all negative":  # a spread over 88: a max taken from the wrong end overflows exp
        x = -torch.rand(4, v, generator=gen) * 199 - 1
    elif case == "all positive":
        x = torch.rand(4, v, generator=gen) * 199 + 1
    elif case == "mixed":
        x = torch.randn(4, v, generator=gen) * 60
    elif case == "masked runs":  # -inf in runs, one row masked all but its last entry
        x = -torch.rand(4, v, generator=gen) * 150
        x[:2, : v // 2] = -torch.inf
        x[3, :-1] = -torch.inf
    elif case == "huge":  # up to half bfloat16's largest magnitude (so x - lse stays finite), both signs
        x = torch.randn(4, v, generator=gen).sign() * 1.6e38 * torch.rand(4, v, generator=gen)
    else:  # signed zeros and tiny values: the integer patterns straddle 0 and 0x8000
        x = torch.randn(4, v, generator=gen) * 1e-30
        x[:, ::3] = -0.0
    x = x.to(torch.bfloat16)
    for row, place in zip(x, (0, v - 1, v // 2, (37 * v) // 41)):  # the max in groups and tails
        if torch.isfinite(row[place]):
            row[place] = row[torch.isfinite(row)].max()
    return x.unsqueeze(0)


@pytest.mark.parametrize("case", ["all negative", "all positive", "mixed", "masked runs", "huge", "zeros"])
def test_bfloat16_rows_of_every_sign_pattern_match_float64(case):
    """The AVX-512 path takes a bfloat16 block's maximum by comparing bit patterns as 16-bit
    integers, which orders negative values backwards (the integer max is the right answer only if
    it is not negative, else the integer min): rows all negative, all positive, of both signs,
    with -inf runs, near bfloat16's largest values and of signed zeros, at lengths that leave
    every kind of tail after the groups of 64 and the 2048-element blocks, against float64."""
    gen = torch.Generator().manual_seed(17)
    for v in (1, 63, 64, 65, 127, 200, 2047, 2048, 2049, 4100):
        logits = _sign_pattern_rows(case, v, gen)
        labels = torch.full((1, 4), v - 1, dtype=torch.long)
        logps, lse, _, logit_sums = ops.logps_forward(logits, labels, -100, False)
        wide = logits.double()
        expected_lse = wide.logsumexp(-1)
        scale = expected_lse.abs().clamp(min=1)
        torch.testing.assert_close(
            lse.double() / scale, expected_lse / scale, atol=2e-6, rtol=0, msg=f"v={v}"
        )
        picked = wide[..., -1]
        atol = 2e-7 * (picked.abs() + expected_lse.abs()).max() + 1e-6  # float32 rounding of x - lse
        torch.testing.assert_close(logps.double(), picked - expected_lse, atol=atol, rtol=0, msg=f"v={v}")
        if wide.isfinite().all() and wide.abs().sum() < 1e37:  # else float32 sums may overflow
            sums = wide.sum((1, 2))
            torch.testing.assert_close(logit_sums.double(), sums, atol=1e-6 * wide.abs().sum(), rtol=0)


_NAN_CHECK = """
import torch
import fastdpo.backends.native
ops = torch.ops.fastdpo
bad = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for v in (100, 2100, 4100):
        for place in (0, 5, 70, v - 1):
            for value in (float("nan"), -float("nan"), float("inf")):
                logits = torch.randn(1, 1, v, generator=torch.Generator().manual_seed(v + place)).to(dtype)
                logits[0, 0, place] = value
                labels = torch.zeros(1, 1, dtype=torch.long)
                _, lse, _, sums = ops.logps_forward(logits, labels, -100, False)
                entropy = ops.logps_forward_statistics(logits, labels, -100, False)[4]
                grad = ops.logps_backward(logits, labels, lse, torch.ones_like(lse), -100, False)
                if not (all(t.isnan().all() for t in (lse, entropy, grad)) and not sums.isfinite().any()):
                    bad.append((str(dtype), v, place, value))
print(bad)
"""


@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_a_nan_logit_makes_its_row_nan(isa):
    """A NaN logit of either sign (as a bfloat16 bit pattern +NaN sorts above +inf), or a +inf
    one (log_softmax's x - max is then NaN), in a vector group, a tail or a later block makes the
    row's log-sum-exp, entropy and gradient NaN (its logit sum NaN or +inf), on the default path
    and the generic one (what AVX2 builds run: at::vec's exp_u20 turns NaN into e^88, which
    made the generic log-sum-exp +inf and its gradient huge, until rows whose logit sum is NaN
    or +inf were checked for either)."""
    result = _run_with_isa(isa, _NAN_CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [1e3, 1e5, 1e7, 1e20, 3e38])
def test_backward_softmax_stays_exact_at_huge_logits(dtype, offset):
    """Logits far from 0 are legal: the backward's softmax exp(x - lse) is taken of x - lse, not
    of x log2 e - lse log2 e, whose rounding of lse log2 e errs by about 4e-8 |lse| (0.3% of
    the softmax at logits of 1e5, all of it at 3e38). Against float64 given the forward's lse."""
    gen = torch.Generator().manual_seed(23)
    logits = (torch.randn(2, 9, 300, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype)
    logits[:, :, 7] = torch.tensor(offset).to(dtype)  # near-ties at 1e7, a unique max beyond
    labels = torch.randint(0, 300, (2, 9), generator=gen)
    labels[:, 3] = 7
    lse = ops.logps_forward(logits, labels, -100, True)[1]
    grad_rows = torch.randn(lse.shape, generator=gen)
    grad = ops.logps_backward(logits, labels, lse, grad_rows, -100, True)
    wide = logits.double()[:, :-1]
    softmax = (wide - lse.double().unsqueeze(-1)).exp()
    onehot = torch.nn.functional.one_hot(labels[:, 1:], 300).double()
    expected = grad_rows.double().unsqueeze(-1) * (onehot - softmax)
    atol = 2e-6 if dtype == torch.float32 else 1e-2  # bfloat16: the gradient's own rounding
    torch.testing.assert_close(
        grad[:, :-1].double(), expected, atol=atol * grad_rows.abs().max().item(), rtol=0
    )
    assert (grad[:, -1] == 0).all()
