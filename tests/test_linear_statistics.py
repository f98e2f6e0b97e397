"""Token statistics on the fused linear path (``fused_linear_logps(statistics=True)``): against
float64 statistics of ``hidden @ weight.T + bias``, every tile-kernel backend, float32 /
bfloat16 / float16, odd shapes and tiles, masked vocabularies; the log-probs and gradients are
bitwise those of ``statistics=False``."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ground_truth import float64_token_statistics
from fastdpo import fused_linear_logps
from fastdpo.backends import get_backend
from tests.helpers import BIAS_MASKS, DTYPES, assert_close_verbose, make_linear, make_masked_linear

# Backends whose fused linear loops compute the statistics; a backend joins by adding its name.
LINEAR_STAT_BACKENDS = ["torch", "native", "triton"]
# Backends whose tile kernels (lse_fold, stats_fold) run linear_tiles' loops; native runs its own in C++.
TILE_KERNEL_BACKENDS = ["torch", "triton"]
# (N, T, H, V, row_tile, vocab_tile): ragged row and vocabulary tiles, one tile, T of 2, a
# vocabulary smaller than a tile, and the default plan (None, None).
CASES = [(4, 9, 16, 37, 5, 8), (2, 2, 8, 5, 64, 512), (6, 7, 24, 130, 4, 64), (2, 12, 5, 33, None, None)]
STAT_ATOL = 2e-4  # as tests/test_statistics.py: float32 sums over V of p log p and p^2
OUTPUTS = ("token_logps", "sequence_logps", "counts", "logit_sums")


def exact_statistics(hidden, weight, bias, labels, **options) -> dict[str, torch.Tensor]:
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    return float64_token_statistics(logits, labels, **options)


def check_statistics(hidden, weight, bias, labels, backend, *, tiles=(None, None), **options):
    out = fused_linear_logps(
        hidden,
        weight,
        labels,
        bias=bias,
        backend=backend,
        row_tile=tiles[0],
        vocab_tile=tiles[1],
        statistics=True,
        **options,
    )
    want = exact_statistics(hidden, weight, bias, labels, **options)
    logit_scale = max(1.0, (hidden.double() @ weight.double().T).abs().max().item())
    for name, expected in want.items():
        actual = getattr(out.statistics, name)
        assert actual.shape == expected.shape, name
        if name == "is_top1":
            assert actual.dtype == torch.bool
            assert torch.equal(actual, expected), (
                f"{backend} is_top1 differs at {(actual != expected).nonzero()}"
            )
        else:
            assert actual.dtype == torch.float32, name
            assert torch.isfinite(actual).all() or name == "mean_logits", name
            atol = STAT_ATOL * (logit_scale if name == "mean_logits" else 1.0)
            assert_close_verbose(actual, expected, atol=atol, what=f"{backend} {name}")
    return out


@pytest.mark.parametrize("backend", LINEAR_STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shift", [True, False])
def test_linear_statistics_match_float64(backend, dtype, case, bias, shift):
    n, t, h, v, *tiles = case
    hidden, weight, b, labels = make_linear(n, t, h, v, dtype, bias=bias, seed=sum(case[:4]))
    check_statistics(hidden, weight, b, labels, backend, tiles=tiles, shift=shift)


def _outputs_and_grads(backend, hidden, weight, bias, labels, statistics):
    x = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    out = fused_linear_logps(
        x[0], x[1], labels, bias=x[2], backend=backend, row_tile=5, vocab_tile=16, statistics=statistics
    )
    gen = torch.Generator().manual_seed(1)
    w_tok = torch.randn(out.token_logps.shape, generator=gen)
    ((out.token_logps * w_tok).sum() + out.sequence_logps.sum()).backward()
    return out, [z.grad for z in x]


@pytest.mark.parametrize("backend", LINEAR_STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_leave_the_log_probs_and_gradients_unchanged(backend, dtype):
    hidden, weight, bias, labels = make_linear(3, 8, 12, 45, dtype, seed=6)
    plain, plain_grads = _outputs_and_grads(backend, hidden, weight, bias, labels, False)
    with_stats, stats_grads = _outputs_and_grads(backend, hidden, weight, bias, labels, True)
    assert plain.statistics is None and with_stats.statistics is not None
    for field in OUTPUTS:
        assert torch.equal(getattr(plain, field), getattr(with_stats, field)), field
    for name, a, b in zip(("hidden", "weight", "bias"), plain_grads, stats_grads):
        assert torch.equal(a, b), name
    assert not any(s.requires_grad for s in with_stats.statistics)
    # and without autograd (a reference model): the same outputs again
    with torch.no_grad():
        frozen = fused_linear_logps(
            hidden, weight, labels, bias=bias, backend=backend, row_tile=5, vocab_tile=16, statistics=True
        )
    for field in OUTPUTS:
        assert torch.equal(getattr(frozen, field), getattr(plain, field)), field
    for a, b in zip(frozen.statistics, with_stats.statistics):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", LINEAR_STAT_BACKENDS)
def test_statistics_of_ignored_and_all_ignored_rows_are_zero(backend):
    hidden, weight, bias, labels = make_linear(3, 8, 10, 29, torch.float32, seed=2)
    labels[1] = -100  # a sequence with nothing counted
    labels[0, 3:5] = -100
    hidden[1] = torch.nan  # never read: its rows are ignored
    out = check_statistics(hidden, weight, bias, labels, backend, tiles=(4, 8))
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.equal(getattr(out.statistics, name)[1], torch.zeros(7)), name
    assert not out.statistics.is_top1[1].any()
    assert torch.equal(out.statistics.entropy[0, 2:4], torch.zeros(2))  # scores labels[0, 3:5]


@pytest.mark.parametrize("backend", LINEAR_STAT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", BIAS_MASKS)
def test_statistics_of_masked_vocabularies(backend, dtype, mask):
    hidden, weight, bias, labels, counted = make_masked_linear(dtype, mask)
    out = check_statistics(hidden, weight, bias, labels, backend, tiles=(5, 8))
    if mask == "all-but-one":  # one possible token: p = 1, entropy 0, log sum p^2 = 0, top-1
        stats = out.statistics
        assert torch.equal(stats.entropy[counted[:, 1:]], torch.zeros(int(counted[:, 1:].sum())))
        assert stats.is_top1[counted[:, 1:]].all()


@pytest.mark.parametrize("backend", LINEAR_STAT_BACKENDS)
def test_is_top1_counts_the_first_maximum_across_tiles(backend):
    """Two vocabulary entries with the same logit, in different tiles (integer inputs: the
    logits are exact, so the tie is exact): the first one is the top-1, as argmax counts it."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randint(-2, 3, (2, 5, 6), generator=gen).float()
    weight = torch.randint(-2, 3, (20, 6), generator=gen).float()
    hidden[..., 0] = 1.0
    weight[:, 0] = 0.0
    weight[3, 0] = weight[13, 0] = 100.0  # columns 3 and 13 tie for the maximum of every row
    weight[13, 1:] = weight[3, 1:]
    labels = torch.tensor([[0, 3, 13, 3, 7], [0, 13, 13, 3, -100]])
    out = check_statistics(hidden, weight, None, labels, backend, tiles=(3, 8))
    assert out.statistics.is_top1.tolist() == [[True, False, True, False], [False, False, True, False]]


def test_stats_fold_is_lse_fold_plus_the_running_sums():
    """Every backend's stats_fold: lse_fold's outputs and tile bitwise, and the running sums and
    first maximum of the contract (fastdpo/backends/__init__.py) against float64, including rows
    whose running max is -inf, a masked tile row, and a tie inside the tile."""
    gen = torch.Generator().manual_seed(0)
    tile = torch.randn(6, 37, generator=gen) * 4
    tile[5] = -torch.inf  # a masked row whose running max is -inf too
    tile[4, 3:9] = -torch.inf
    tile[3, 7] = tile[3, 20] = 30.0  # a tie: column 7 is the first maximum
    run_max = torch.tensor([-torch.inf, 0.0, 5.0, -1.0, 20.0, -torch.inf])
    run_sum = torch.tensor([0.0, 1.5, 2.0, 0.5, 1.0, 0.0])
    run_weighted = torch.tensor([0.0, -1.5, 2.0, 0.5, -1.0, 0.0])
    run_sq = torch.tensor([0.0, 1.0, 2.0, 0.25, 1.0, 0.0])
    # float64 truth: sums relative to the new max m (0 where it is -inf)
    x = tile.double()
    m = torch.maximum(run_max.double(), x.amax(1))
    origin = torch.where(m == -torch.inf, 0.0, m)
    rescale = torch.exp(run_max.double() - origin)
    e = torch.exp(x - origin.unsqueeze(1))
    centred = torch.where(e > 0, x - origin.unsqueeze(1), 0.0)
    shift = torch.where(run_max == -torch.inf, 0.0, run_max.double() - origin) * run_sum.double()
    want_weighted = rescale * (run_weighted.double() + shift) + (e * centred).sum(1)
    want_sq = rescale**2 * run_sq.double() + (e * e).sum(1)
    for name in TILE_KERNEL_BACKENDS:
        kernels = get_backend(name)
        plain_tile, stats_tile = tile.clone(), tile.clone()
        plain = kernels.lse_fold(plain_tile, run_max, run_sum)
        *first, weighted, sq, top = kernels.stats_fold(stats_tile, run_max, run_sum, run_weighted, run_sq)
        assert all(torch.equal(a, b) for a, b in zip(plain, first)), name
        assert torch.equal(plain_tile, stats_tile), name
        assert_close_verbose(weighted, want_weighted, atol=1e-5, rtol=1e-5, what=f"{name} weighted")
        assert_close_verbose(sq, want_sq, atol=1e-5, rtol=1e-5, what=f"{name} sq")
        assert top.dtype == torch.int64 and top.tolist()[:5] == tile.argmax(1).tolist()[:5], name


def test_tile_kernels_without_statistics_refuse_them(monkeypatch):
    """Tile kernels without a ``stats_fold``: asking for statistics is a clear error, not a silent None."""
    import dataclasses

    from fastdpo import linear

    bare = dataclasses.replace(get_backend("torch"), stats_fold=None)
    monkeypatch.setattr(linear, "resolve_backend", lambda name, device: bare)
    hidden, weight, bias, labels = make_linear(2, 4, 6, 11, torch.float32)
    with pytest.raises(ValueError, match="statistics=True is not implemented by the 'torch' tile kernels"):
        fused_linear_logps(hidden, weight, labels, bias=bias, statistics=True)
    plain = fused_linear_logps(hidden, weight, labels, bias=bias)
    assert plain.statistics is None
