"""use_weighting (WPO), ld_alpha (LD-DPO) and the token metrics of DPOLoss / FusedLinearDPOLoss
against TRL 1.16's own ``DPOTrainer._compute_loss``, run on a stand-in model whose fused head
returns per-token outputs computed from the same logits (in float64 for the float64 reference).

The stand-in is the one thing these tests assume of TRL: that its fused LM head returns, per
shifted position, ``log_probs`` (0 where the label is -100), ``entropy``, ``log_sum_sq_probs``,
``mean_logits`` and ``is_top1`` of ``softmax(logits)``. Everything after that is TRL's code.

Backends: the logits path needs ``statistics=True`` of ``fused_logps``; the fused linear path
needs it of ``fused_linear_logps`` (issue 16 item 2, one backend at a time). A backend joins a list
by adding its name.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from benchmarks.ground_truth import float64_token_statistics
from fastdpo import DPOLoss, FusedLinearDPOLoss
from fastdpo.functional import length_desensitized_logps, wpo_weights

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")  # the [trl] extra; installed in CI

LOGITS_BACKENDS = ["torch", "triton"]  # fused_logps(statistics=True)
LINEAR_BACKENDS = ["torch", "triton", "native"]  # fused_linear_logps(statistics=True)
# (prompt tokens, chosen tokens, rejected tokens) of three pairs: unequal completions, so LD-DPO's
# shared prefix differs from both, and one pair whose rejected completion is the longer.
PAIRS = [(2, 5, 3), (3, 2, 6), (1, 4, 4)]
V, H = 29, 8
OPTIONS = [
    dict(use_weighting=True),
    dict(ld_alpha=0.5),
    dict(ld_alpha=0.0),
    dict(use_weighting=True, ld_alpha=0.3),
    dict(ld_alpha=0.7, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(use_weighting=True, ld_alpha=0.7, loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.5]),
    dict(use_weighting=True, loss_type="ipo"),
    dict(ld_alpha=0.4, loss_type="apo_zero"),
]


def batch(seed: int = 0):
    """TRL's collated batch: [chosen; rejected] rows of prompt + completion, padded right."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    width = max(p + c for p, c in rows) + 1
    ids = torch.randint(0, V, (len(rows), width), generator=gen)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    completion = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        attention[i, : p + c] = 1
        completion[i, p : p + c] = 1
    labels = ids.masked_fill(completion == 0, -100)
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, labels


class FusedHead(torch.nn.Module):
    """Stands in for a model under TRL's fused LM head: fixed logits, TRL's per-token outputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.is_gradient_checkpointing = logits, False

    def forward(self, input_ids, attention_mask, use_cache, labels, fused_lm_head):
        x, target = self.logits[:, :-1], labels[:, 1:]
        counted = target != -100
        logp = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        stats = float64_token_statistics(self.logits.detach(), labels)
        as_dtype = {k: v if k == "is_top1" else v.to(logp.dtype) for k, v in stats.items()}
        return SimpleNamespace(log_probs=torch.where(counted, picked, 0.0), **as_dtype)


def trl_loss(
    policy_logits, ref_logits, inputs, *, beta=0.1, loss_type="sigmoid", loss_weights=None, **options
):
    """TRL 1.16's loss and logged metrics for one batch (its ``_compute_loss``, unmodified)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = SimpleNamespace(
        model=FusedHead(policy_logits).train(),
        ref_model=FusedHead(ref_logits),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=beta,
        loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types),
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        use_weighting=options.get("use_weighting", False),
        ld_alpha=options.get("ld_alpha"),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def logits_pair(seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    inputs, labels = batch(seed)
    shape = (*labels.shape, V)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
        inputs,
        labels,
    )


def check_against_trl(out, policy, loss, metrics, reference_loss, reference_metrics, reference_grad, tol):
    assert out.loss.item() == pytest.approx(reference_loss.item(), rel=tol, abs=tol)
    got = out.metrics()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert got[name] == pytest.approx(reference_metrics[name], rel=tol, abs=tol), name
    for name in ("entropy", "mean_token_accuracy"):
        assert (name in got) == (out.token_sums is not None), name
        if name in got:
            assert got[name] == pytest.approx(reference_metrics[name], rel=tol, abs=tol), name
    torch.testing.assert_close(policy.grad.double(), reference_grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_logits_loss_matches_trl(backend, options):
    policy, ref, inputs, labels = logits_pair()
    x = policy.clone().requires_grad_(True)
    out = DPOLoss(beta=0.1, backend=backend, token_metrics=True, **options)(x, labels, ref)
    out.loss.backward()
    # TRL's code in float32 on the same logits: the same computation, float32 rounding apart
    p32 = policy.clone().requires_grad_(True)
    loss32, metrics32 = trl_loss(p32, ref, inputs, **options)
    loss32.backward()
    check_against_trl(out, x, out.loss, out.metrics(), loss32, metrics32, p32.grad.double(), 1e-5)
    # and in float64: the truth
    p64 = policy.double().requires_grad_(True)
    loss64, metrics64 = trl_loss(p64, ref.double(), inputs, **options)
    loss64.backward()
    check_against_trl(out, x, out.loss, out.metrics(), loss64, metrics64, p64.grad, 1e-5)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("token_metrics", [False, True], ids=["", "token_metrics"])
def test_fused_linear_loss_matches_trl(backend, options, token_metrics):
    gen = torch.Generator().manual_seed(3)
    inputs, labels = batch(3)
    hidden, ref_hidden = (torch.randn(*labels.shape, H, generator=gen) for _ in range(2))
    weight = torch.randn(V, H, generator=gen) / H**0.5
    h = hidden.clone().requires_grad_(True)
    out = FusedLinearDPOLoss(beta=0.1, backend=backend, token_metrics=token_metrics, **options)(
        h, weight, labels, ref_hidden=ref_hidden
    )
    out.loss.backward()
    h64 = hidden.double().requires_grad_(True)
    loss64, metrics64 = trl_loss(
        h64 @ weight.double().T, ref_hidden.double() @ weight.double().T, inputs, **options
    )
    loss64.backward()
    check_against_trl(out, h, out.loss, out.metrics(), loss64, metrics64, h64.grad, 1e-4)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_fused_linear_ld_alpha_without_statistics_matches_logits(backend):
    """LD-DPO reads only the token log-probs: no statistics are asked of the kernels."""
    gen = torch.Generator().manual_seed(4)
    _, labels = batch(4)
    hidden = torch.randn(*labels.shape, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen)
    fused = FusedLinearDPOLoss(backend=backend, ld_alpha=0.25, reference_free=True)(hidden, weight, labels)
    logits = (hidden.detach() @ weight.T).requires_grad_(True)
    plain = DPOLoss(backend="torch", ld_alpha=0.25, reference_free=True)(logits, labels)
    assert fused.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
    fused.loss.backward(), plain.loss.backward()
    torch.testing.assert_close(hidden.grad, plain_grad_to_hidden(logits.grad, weight), rtol=1e-4, atol=1e-6)


def plain_grad_to_hidden(grad_logits, weight):
    return grad_logits @ weight


def test_ld_alpha_one_is_plain_dpo_and_zero_keeps_the_shared_prefix():
    policy, ref, _, labels = logits_pair(seed=5)
    plain = DPOLoss(backend="torch")(policy, labels, ref)
    one = DPOLoss(backend="torch", ld_alpha=1.0)(policy, labels, ref)
    assert one.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    zero = DPOLoss(backend="torch", ld_alpha=0.0)(policy, labels, ref)
    # pair 0: chosen 5 tokens, rejected 3 (one fewer scored each: the completion's first token is
    # scored from the prompt's last logit, so all are scored here): the chosen row keeps 3 tokens
    target = labels[:, 1:]
    token = torch.log_softmax(policy[:, :-1].double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    token = torch.where(target != -100, token, 0.0)
    kept = token[0][target[0] != -100][:3].sum()
    assert zero.policy_chosen_logps[0].item() == pytest.approx(kept.item(), rel=1e-5)
    assert zero.policy_rejected_logps[0].item() == pytest.approx(token[3].sum().item(), rel=1e-5)


def test_wpo_weights_scale_the_sft_term_by_their_mean():
    """TRL 1.16 raises on sft with use_weighting (an in-place product on an expanded tensor; with
    hinge its backward fails the same way, on relu's output); the
    formula it means is each pair's share of the sft NLL times that pair's weight."""
    policy, ref, _, labels = logits_pair(seed=9)
    weighted = DPOLoss(backend="torch", loss_type="sft", use_weighting=True)(policy, labels, ref)
    plain = DPOLoss(backend="torch", loss_type="sft")(policy, labels, ref)
    stats = float64_token_statistics(policy, labels)
    token = torch.log_softmax(policy[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    counted = labels[:, 1:] != -100
    token = torch.where(counted, token, 0.0)
    w = torch.exp((token - stats["log_sum_sq_probs"]).sum(-1) / counted.sum(-1)).chunk(2)
    expected = plain.loss.item() * (w[0] * w[1]).mean().item()
    assert weighted.loss.item() == pytest.approx(expected, rel=1e-5)


def test_wpo_weights_have_no_gradient_and_follow_the_paper():
    token = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    log_sq = torch.tensor([[-0.3, -0.4, 0.0], [-0.2, 0.0, 0.0]])
    w = wpo_weights(token, log_sq, torch.tensor([2, 1]))
    expected = torch.exp(torch.tensor((-1.0 + 0.3 - 2.0 + 0.4) / 2)) * torch.exp(torch.tensor(-0.5 + 0.2))
    assert not w.requires_grad and w.item() == pytest.approx(expected.item(), rel=1e-6)


def test_length_desensitized_logps_split():
    token = torch.tensor([[-1.0, -2.0, -4.0, 0.0], [0.0, -8.0, -16.0, 0.0]])
    counted = torch.tensor([[True, True, True, False], [False, True, False, False]])
    got = length_desensitized_logps(token, counted, 0.5)  # shared length 1
    assert got.tolist() == [-1.0 - 0.5 * (2.0 + 4.0), -8.0]


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_token_metrics_match_float64(backend):
    policy, ref, _, labels = logits_pair(seed=6)
    out = DPOLoss(backend=backend, token_metrics=True)(policy, labels, ref)
    stats = float64_token_statistics(policy, labels)
    counted = labels[:, 1:] != -100
    pairs = len(PAIRS)
    metrics = out.metrics()
    assert metrics["entropy"] == pytest.approx((stats["entropy"].sum() / counted.sum()).item(), rel=1e-5)
    top1 = stats["is_top1"][:pairs].sum() / counted[:pairs].sum()
    assert metrics["mean_token_accuracy"] == pytest.approx(top1.item(), abs=1e-12)


def test_token_metrics_are_absent_unless_asked_and_need_no_statistics():
    policy, ref, _, labels = logits_pair(seed=7)
    out = DPOLoss(backend="torch")(policy, labels, ref)
    assert out.token_sums is None and "entropy" not in out.metrics()
    loss = DPOLoss(backend="torch", ld_alpha=0.5)
    assert not loss.needs_statistics  # LD-DPO reads token log-probs only
    assert DPOLoss(backend="torch", use_weighting=True).needs_statistics
    assert DPOLoss(backend="torch", token_metrics=True).needs_statistics


def test_token_metrics_of_a_batch_without_counted_tokens_are_zero():
    policy, ref, _, labels = logits_pair(seed=8)
    labels = torch.full_like(labels, -100)
    metrics = DPOLoss(backend="torch", token_metrics=True)(policy, labels, ref).metrics()
    assert metrics["entropy"] == 0.0 and metrics["mean_token_accuracy"] == 0.0


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_token_options_keep_the_forward_on_the_device(monkeypatch, backend):
    """No .item() / .tolist() / float() with the token options either (a sync each on CUDA)."""
    policy, ref, _, labels = logits_pair(seed=10)
    loss = DPOLoss(backend=backend, use_weighting=True, ld_alpha=0.5, token_metrics=True)

    def sync(*_):
        raise AssertionError("the loss forward moved a value to the host")

    for name in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = loss(policy, labels, ref)
    tensors = out.metric_tensors()
    monkeypatch.undo()
    assert {"entropy", "mean_token_accuracy"} <= set(tensors)
    assert all(t.dim() == 0 and not t.requires_grad for t in tensors.values())


@pytest.mark.parametrize(
    "options, wanted",
    [
        ({}, False),
        (dict(ld_alpha=0.5), False),
        (dict(use_weighting=True), True),
        (dict(token_metrics=True), True),
    ],
    ids=str,
)
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "linear"])
def test_statistics_are_asked_of_the_policy_pass_only_when_needed(monkeypatch, options, wanted, fused_linear):
    import fastdpo.modules as modules

    asked = []
    name = "fused_linear_logps" if fused_linear else "fused_logps"
    kernel = getattr(modules, name)

    def spy(*args, **kwargs):
        asked.append(kwargs.get("statistics", False))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(modules, name, spy)
    gen = torch.Generator().manual_seed(11)
    _, labels = batch(11)
    if fused_linear:
        hidden, weight = torch.randn(*labels.shape, H, generator=gen), torch.randn(V, H, generator=gen)
        call = lambda loss: loss(hidden, weight, labels, ref_hidden=hidden.flip(0))  # noqa: E731
        make = FusedLinearDPOLoss
    else:
        logits = torch.randn(*labels.shape, V, generator=gen)
        call = lambda loss: loss(logits, labels, logits.flip(0))  # noqa: E731
        make = DPOLoss
    call(make(backend="torch", **options))
    assert asked[0] == wanted  # the policy's pass
    assert not any(asked[1:])  # the reference's never


@pytest.mark.parametrize(
    "options", [dict(ld_alpha=0.5), dict(use_weighting=True), dict(token_metrics=True)], ids=str
)
def test_token_options_take_the_recompute_path_on_native(options):
    """The native chunk kernel makes no per-token outputs: these options recompute instead."""
    gen = torch.Generator().manual_seed(12)
    _, labels = batch(12)
    hidden = torch.randn(*labels.shape, H, generator=gen, requires_grad=True)
    weight = torch.randn(V, H, generator=gen)
    plain = FusedLinearDPOLoss(backend="native", reference_free=True)(hidden, weight, labels)
    assert type(plain.loss.grad_fn).__name__ == "_LossInForwardBackward"
    out = FusedLinearDPOLoss(backend="native", reference_free=True, **options)(hidden, weight, labels)
    assert type(out.loss.grad_fn).__name__ != "_LossInForwardBackward"
