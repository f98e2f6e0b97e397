"""Token statistics of the native fused linear kernel (``native_linear.forward_tiles(...,
statistics=True)``): entropy, log sum p^2 and is_top1 per counted row against float64 on the
float64 logits of the same inputs, on both operand paths; ties (the first maximum wins, also
across vocabulary blocks), masked vocabularies, all-ignored rows, the other results unchanged,
bitwise equal for 1 and 2 threads."""

import pytest
import torch
from helpers import make_linear
from test_native_linear import thread_digests

from benchmarks.ground_truth import float64_token_statistics
from fastdpo.backends import native_linear
from fastdpo.backends.common import counted_rows
from fastdpo.backends.linear_tiles import Rows

# float32 sums over V of e (x - m) and e^2 (tests/test_statistics.py uses the same bound).
STAT_ATOL = 2e-4
# (N, T, H, V, row_tile, vocab_tile): ragged tiles, odd tile sizes, an odd hidden size, one tile.
CASES = [(4, 9, 16, 37, 5, 8), (2, 12, 6, 33, 7, 33), (6, 7, 24, 130, 3, 63), (2, 20, 5, 19, 64, 512)]


@pytest.fixture(params=["auto", "float32"])
def operands(request, monkeypatch):
    monkeypatch.setenv(native_linear.OPERANDS_ENV, request.param)
    return request.param


def _statistics(hidden, weight, bias, labels, tiles):
    """forward_tiles' per-row results with statistics, the rows, and float64 truth at them."""
    n, t, y = counted_rows(labels, -100, True)
    plan = native_linear.plan_tiles(hidden.dtype, hidden.shape[-1], *tiles)
    out = native_linear.forward_tiles(hidden, weight, bias, Rows(n, t, y), None, plan, statistics=True)
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    truth = float64_token_statistics(logits, labels)
    return out, {k: v[n, t] for k, v in truth.items()}, logits[:, :-1][n, t]


def _check(out, truth, logits):
    entropy, log_sum_sq, is_top1 = out[3:]
    assert entropy.dtype == log_sum_sq.dtype == torch.float32 and is_top1.dtype == torch.bool
    torch.testing.assert_close(entropy.double(), truth["entropy"], atol=STAT_ATOL, rtol=0)
    torch.testing.assert_close(log_sum_sq.double(), truth["log_sum_sq_probs"], atol=STAT_ATOL, rtol=0)
    # Rows whose two largest logits are closer than float32's accumulation error may order them
    # either way; every other row must agree exactly (ties: test_ties_keep_the_first_maximum).
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.9
    assert torch.equal(is_top1[clear], truth["is_top1"][clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_statistics_match_float64(operands, dtype, case):
    n, t, h, v, row_tile, vocab_tile = case
    hidden, weight, bias, labels = make_linear(n, t, h, v, dtype)
    _check(*_statistics(hidden, weight, bias, labels, (row_tile, vocab_tile)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_vocabulary(operands, dtype):
    """-inf bias over whole vocabulary blocks (first, middle, last): masked entries add 0 to the
    entropy and to sum p^2 (never 0 * -inf), and no row becomes NaN."""
    hidden, weight, bias, labels = make_linear(4, 10, 16, 70, dtype)
    masked = torch.zeros(70, dtype=torch.bool)
    masked[:16] = masked[32:48] = masked[64:] = True
    bias = bias.masked_fill(masked, -torch.inf)
    labels = labels.masked_fill(masked[labels.clamp(min=0)] & (labels >= 0), 20)
    out, truth, logits = _statistics(hidden, weight, bias, labels, (3, 16))
    assert all(torch.isfinite(x).all() for x in out[3:5])
    _check(out, truth, logits)


def test_ties_keep_the_first_maximum(operands):
    """Zero hidden rows make every logit its bias: the maximum is tied at 3, 5 (one block) and 40
    (a later block of 16); only a label at 3 is the top-1."""
    hidden, weight, _, labels = make_linear(2, 6, 8, 50, torch.bfloat16)
    hidden.zero_()
    bias = torch.zeros(50, dtype=torch.bfloat16)
    bias[[3, 5, 40]] = 2.0
    labels[:, 1:] = torch.tensor([3, 5, 40, 7, 3])
    out, truth, _ = _statistics(hidden, weight, bias, labels, (4, 16))
    assert out[5].tolist() == [True, False, False, False, True] * 2 == truth["is_top1"].tolist()
    torch.testing.assert_close(out[3].double(), truth["entropy"], atol=STAT_ATOL, rtol=0)


def test_all_ignored_rows_and_the_other_results_unchanged(operands):
    hidden, weight, bias, labels = make_linear(4, 9, 16, 37, torch.bfloat16)
    labels[1] = -100  # a sequence without a counted row
    n, t, y = counted_rows(labels, -100, True)
    plan = native_linear.plan_tiles(hidden.dtype, 16, 5, 8)
    rows = Rows(n, t, y)
    plain = native_linear.forward_tiles(hidden, weight, bias, rows, None, plan)
    grads = [torch.zeros_like(hidden) for _ in range(2)]
    with_grad = native_linear.forward_tiles(hidden, weight, bias, rows, None, plan, grads[0])
    stats = native_linear.forward_tiles(hidden, weight, bias, rows, None, plan, grads[1], statistics=True)
    assert len(plain) == 3 and len(stats) == 6
    assert all(torch.equal(a, b) for a, b in zip(plain, stats[:3]))
    assert all(torch.equal(a, b) for a, b in zip(with_grad, stats[:3])) and torch.equal(*grads)
    none = Rows(n[:0], t[:0], y[:0])
    empty = native_linear.forward_tiles(hidden, weight, bias, none, None, plan, statistics=True)
    assert [x.shape for x in empty] == [torch.Size([0])] * 6


_THREADS = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from benchmarks.ground_truth import make_linear
from fastdpo.backends import native_linear
from fastdpo.backends.common import counted_rows
from fastdpo.backends.linear_tiles import Rows
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    hidden, weight, bias, labels = make_linear(4, 97, 64, 1500, dtype)
    plan = native_linear.plan_tiles(dtype, 64, 16, 128)
    out = native_linear.forward_tiles(hidden, weight, bias, Rows(*counted_rows(labels, -100, True)), None, plan,
                                      statistics=True)
    print(dtype, hashlib.sha256(b"".join(x.numpy().tobytes() for x in out)).hexdigest())
"""


@pytest.mark.parametrize("forced", ["auto", "float32"])
def test_bitwise_equal_for_one_and_two_threads(forced):
    digests = thread_digests(_THREADS, forced)
    assert digests[0].count("torch.") == 3 and digests[0] == digests[1]
