"""DPOLoss, dispatch and bad input."""

import pytest
import torch
from helpers import BACKENDS, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import DPOLoss, FusedLinearDPOLoss, preference_loss, sequence_logps, token_logps
from fastdpo.naive import naive_mean_logit_sums, naive_sequence_logps


def dpo_batch(pairs=3, t=9, v=29, dtype=torch.float32, seed=0):
    logits, labels = make_inputs(2 * pairs, t, v, dtype, seed=seed)
    ref_logits, _ = make_inputs(2 * pairs, t, v, dtype, seed=seed + 1)
    return logits, labels, ref_logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_loss_matches_reference_pipeline(backend):
    logits, labels, ref_logits = dpo_batch()
    x = logits.clone().requires_grad_(True)
    out = DPOLoss(beta=0.2, backend=backend)(x, labels, ref_logits)
    out.loss.backward()

    y = logits.clone().requires_grad_(True)
    pi = naive_sequence_logps(y, labels)
    ref = naive_sequence_logps(ref_logits, labels)
    losses, cr, rr = preference_loss(pi[:3], pi[3:], ref[:3], ref[3:], beta=0.2)
    losses.mean().backward()

    torch.testing.assert_close(out.loss, losses.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.chosen_rewards, cr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.policy_rejected_logps, pi[3:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_use_trl_names_and_values(backend):
    logits, labels, ref_logits = dpo_batch()
    out = DPOLoss(backend=backend)(logits, labels, ref_logits)
    m = out.metrics()
    names = "rewards/chosen rewards/rejected rewards/accuracies rewards/margins"
    names += " logps/chosen logps/rejected logits/chosen logits/rejected"
    assert set(m) == set(names.split())
    assert all(isinstance(v, float) for v in m.values())
    sums = naive_mean_logit_sums(logits, labels)
    counts = (labels[:, 1:] != -100).sum(-1)
    v = logits.shape[-1]
    assert m["logits/chosen"] == pytest.approx(
        sums[:3].sum().item() / (counts[:3].sum().item() * v), rel=1e-4
    )
    assert m["logits/rejected"] == pytest.approx(
        sums[3:].sum().item() / (counts[3:].sum().item() * v), rel=1e-4
    )
    margins = out.chosen_rewards - out.rejected_rewards
    assert m["rewards/margins"] == pytest.approx(margins.mean().item())
    assert m["rewards/accuracies"] == pytest.approx((margins > 0).float().mean().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "linear"])
def test_forward_keeps_metrics_on_the_device(monkeypatch, backend, fused_linear):
    """No .item() / .tolist() / float() in the loss: on CUDA each is a device sync every step."""
    logits, labels, _ = dpo_batch()
    hidden, weight = torch.randn(6, 9, 8), torch.randn(29, 8)

    def sync(*_):
        raise AssertionError("the loss forward moved a value to the host")

    for name in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    if fused_linear:
        out = FusedLinearDPOLoss(backend=backend)(hidden, weight, labels, ref_hidden=hidden.flip(0))
    else:
        out = DPOLoss(backend=backend)(logits, labels, ref_logps=torch.zeros(6))
    tensors = out.metric_tensors()
    monkeypatch.undo()
    assert all(t.dim() == 0 and not t.requires_grad for t in tensors.values())
    assert out.metrics() == pytest.approx({name: t.item() for name, t in tensors.items()})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "linear"])
def test_logits_metric_near_the_float32_maximum(backend, fused_linear):
    """Each row's logit sum (4 tokens x 7 entries x 7e36 = 1.96e38) fits in float32, their total
    over 3 rows does not; the mean, 7e36, is representable and must come out."""
    labels = torch.zeros(6, 5, dtype=torch.long)
    if fused_linear:
        out = FusedLinearDPOLoss(reference_free=True, backend=backend)(
            torch.full((6, 5, 1), 7e36), torch.ones(7, 1), labels
        )
    else:
        out = DPOLoss(reference_free=True, backend=backend)(torch.full((6, 5, 7), 7e36), labels)
    m = out.metrics()
    assert m["logits/chosen"] == pytest.approx(7e36, rel=1e-6)
    assert m["logits/rejected"] == pytest.approx(7e36, rel=1e-6)


def test_precomputed_ref_logps_equal_ref_logits():
    logits, labels, ref_logits = dpo_batch()
    ref_logps = naive_sequence_logps(ref_logits, labels)
    a = DPOLoss()(logits, labels, ref_logits)
    b = DPOLoss()(logits, labels, ref_logps=ref_logps)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


def test_reference_free_sets_reference_to_zero():
    logits, labels, _ = dpo_batch()
    out = DPOLoss(reference_free=True, beta=0.3)(logits, labels)
    assert (out.ref_chosen_logps == 0).all()
    torch.testing.assert_close(out.chosen_rewards, 0.3 * out.policy_chosen_logps)


def test_average_log_prob_uses_means():
    logits, labels, ref_logits = dpo_batch()
    out = DPOLoss(average_log_prob=True)(logits, labels, ref_logits)
    expected = naive_sequence_logps(logits, labels, average=True)[:3]
    torch.testing.assert_close(out.policy_chosen_logps, expected, atol=1e-5, rtol=1e-5)


def test_loss_list_and_sft_term():
    logits, labels, ref_logits = dpo_batch()
    out = DPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])(logits, labels, ref_logits)
    base = DPOLoss()(logits, labels, ref_logits)
    pi = naive_sequence_logps(logits, labels)[:3]
    n = (labels[:3, 1:] != -100).sum()
    torch.testing.assert_close(out.loss, base.loss + 0.5 * (-pi.sum() / n), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_logits_give_float32_outputs_and_native_dtype_grads(dtype):
    logits, labels, ref_logits = dpo_batch(dtype=dtype)
    x = logits.clone().requires_grad_(True)
    out = DPOLoss()(x, labels, ref_logits)
    out.loss.backward()
    assert out.policy_chosen_logps.dtype == torch.float32 and x.grad.dtype == dtype


def test_all_ignored_pair_gives_finite_loss_and_grad():
    logits, labels, ref_logits = dpo_batch()
    labels[0] = -100
    labels[3] = -100
    x = logits.clone().requires_grad_(True)
    for loss_type in ("sigmoid", "ipo", "sigmoid_norm", "simpo"):
        out = DPOLoss(loss_type=loss_type)(x, labels, ref_logits)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert (x.grad[0] == 0).all() and (x.grad[3] == 0).all()


def test_available_backends_lists_torch():
    assert "torch" in fastdpo.available_backends()
    assert "torch" in fastdpo.available_backends("cpu")


def test_auto_backend_runs_on_cpu():
    logits, labels = make_inputs(2, 5, 11)
    torch.testing.assert_close(
        sequence_logps(logits, labels), sequence_logps(logits, labels, backend="torch")
    )


# --- bad input -------------------------------------------------------------------------


def test_unknown_backend_names_the_choices():
    logits, labels = make_inputs(2, 5, 11)
    with pytest.raises(ValueError, match="unknown backend 'cuda_magic'.*'torch'"):
        token_logps(logits, labels, backend="cuda_magic")


def test_unavailable_backend_names_available_ones_and_fallback(monkeypatch):
    from fastdpo import backends

    monkeypatch.setitem(backends._loaded, "triton", None)
    monkeypatch.setitem(backends._why_unavailable, "triton", "ModuleNotFoundError: No module named 'triton'")
    logits, labels = make_inputs(2, 5, 11)
    with pytest.raises(
        ValueError, match=r"'triton' is not available.*No module named 'triton'.*'torch'.*falls back"
    ):
        token_logps(logits, labels, backend="triton")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 5, 7), torch.randn(2, 5)), TypeError, "integer"),
        (lambda: (torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.bool)), TypeError, "integer"),
        (
            lambda: (torch.randn(2, 5, 7).double(), torch.zeros(2, 5, dtype=torch.long)),
            TypeError,
            "float32, bfloat16",
        ),
        (
            lambda: (torch.randint(0, 3, (2, 5, 7)), torch.zeros(2, 5, dtype=torch.long)),
            TypeError,
            "float32, bfloat16",
        ),
        (lambda: (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)), ValueError, "does not match"),
        (lambda: (torch.randn(10, 7), torch.zeros(10, dtype=torch.long)), ValueError, r"\[N, T, V\]"),
        (lambda: (torch.randn(2, 1, 7), torch.zeros(2, 1, dtype=torch.long)), ValueError, "T >= 2"),
        (
            lambda: (torch.randn(2, 5, 7).transpose(1, 2), torch.zeros(2, 7, dtype=torch.long)),
            ValueError,
            "contiguous last",
        ),
        (lambda: (torch.randn(2, 5, 7), torch.full((2, 5), 7)), ValueError, r"label 7 is outside \[0, 7\)"),
        (lambda: (torch.randn(2, 5, 7), torch.full((2, 5), -1)), ValueError, r"label -1 is outside"),
        (lambda: ("logits", torch.zeros(2, 5, dtype=torch.long)), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, error, match):
    logits, labels = make()
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            token_logps(logits, labels, backend=backend)


def test_out_of_range_label_at_an_unscored_position_is_fine():
    logits = torch.randn(2, 5, 7)
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[:, 0] = 99  # never scored under shift=True (the first token has no predecessor)
    assert torch.isfinite(token_logps(logits, labels)).all()
    with pytest.raises(ValueError, match="label 99"):
        token_logps(logits, labels, shift=False)


def test_odd_batch_raises():
    logits, labels = make_inputs(3, 5, 7)
    with pytest.raises(ValueError, match="even"):
        DPOLoss(reference_free=True)(logits, labels)


@pytest.mark.parametrize("refs", ["none", "both", "free_and_logits"])
def test_exactly_one_reference(refs):
    logits, labels, ref_logits = dpo_batch()
    ref_logps = torch.zeros(6)
    with pytest.raises(ValueError, match="exactly one reference"):
        if refs == "none":
            DPOLoss()(logits, labels)
        elif refs == "both":
            DPOLoss()(logits, labels, ref_logits, ref_logps=ref_logps)
        else:
            DPOLoss(reference_free=True)(logits, labels, ref_logits)


def test_bad_ref_shapes_raise():
    logits, labels, ref_logits = dpo_batch()
    with pytest.raises(ValueError, match="ref_logps must be"):
        DPOLoss()(logits, labels, ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match="ref_logits shape"):
        DPOLoss()(logits, labels, ref_logits[:, :-1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loss_type": "dpo"}, ValueError, "unknown loss_type"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": "0.1"}, TypeError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"loss_weights": [float("nan")]}, ValueError, r"loss_weights\[0\]"),
        ({"discopop_tau": -1.0}, ValueError, "discopop_tau"),
        ({"simpo_gamma": "0.5"}, TypeError, "simpo_gamma"),
        ({"ignore_index": "-100"}, TypeError, "ignore_index"),
        ({"reference_free": "yes"}, TypeError, "reference_free"),
        ({"average_log_prob": 1}, TypeError, "average_log_prob"),
        ({"shift": None}, TypeError, "shift"),
        ({"backend": None}, TypeError, "backend"),
    ],
)
@pytest.mark.parametrize("module", [DPOLoss, FusedLinearDPOLoss])
def test_bad_loss_options_raise_at_construction(module, kwargs, error, match):
    with pytest.raises(error, match=match):
        module(**kwargs)


def test_inplace_backward_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace_backward"):
        DPOLoss(inplace_backward="no")


def test_empty_batch_raises_instead_of_nan():
    labels = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="policy_logits is an empty batch"):
        DPOLoss(reference_free=True)(torch.zeros(0, 5, 7), labels)
    with pytest.raises(ValueError, match="hidden is an empty batch"):
        FusedLinearDPOLoss(reference_free=True)(torch.zeros(0, 5, 4), torch.zeros(7, 4), labels)


def test_bad_references_name_the_argument():
    logits, labels, ref_logits = dpo_batch()
    cases = [
        ({"ref_logps": torch.zeros(6, device="meta")}, ValueError, "ref_logps is on meta"),
        ({"ref_logps": torch.zeros(6, dtype=torch.long)}, TypeError, "ref_logps must hold floating"),
        ({"ref_logps": [0.0] * 6}, TypeError, "ref_logps must be a torch.Tensor"),
        ({"ref_logits": ref_logits.to("meta")}, ValueError, "ref_logits is on meta"),
        (
            {"ref_logits": ref_logits.double()},
            TypeError,
            r"reference pass \(ref_logits\): logits must be float32",
        ),
        ({"ref_logits": "logits"}, TypeError, "ref_logits must be a torch.Tensor"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            DPOLoss()(logits, labels, **kwargs)
    hidden, weight = torch.randn(6, 9, 8), torch.randn(29, 8)
    with pytest.raises(ValueError, match="ref_hidden is on meta"):
        FusedLinearDPOLoss()(hidden, weight, labels, ref_hidden=hidden.to("meta"))
    with pytest.raises(
        ValueError, match=r"reference pass \(ref_hidden, ref_weight, ref_bias\): weight must be"
    ):
        FusedLinearDPOLoss()(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight[:, :4])


class _HostReads(TorchDispatchMode):
    """Counts the ops whose result must reach the host (on CUDA, each is a device sync)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if bool_index or func in (
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.nonzero.default,
            torch.ops.aten.masked_select.default,
            torch.ops.aten.is_nonzero.default,
        ):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native extension is not built")
def test_the_label_check_is_the_one_host_read_of_a_forward():
    """Validating the labels costs one device sync per forward (it was three: a boolean index, the
    min and the max); the native kernel itself reads nothing back."""
    logits, labels = make_inputs(4, 9, 29, torch.float32)
    labels[0, 3] = -100
    with _HostReads() as reads:
        fastdpo.fused_logps(logits, labels, backend="native")
    assert reads.count == 1
    labels[1, 4] = 29
    with pytest.raises(ValueError, match=r"label 29 is outside \[0, 29\) and is not ignore_index \(-100\)"):
        fastdpo.fused_logps(logits, labels, backend="native")
