"""The fused linear path against the peers it replaces, on the same inputs: Liger's
``LigerFusedLinearDPOLoss`` (loss, log-probs, rewards, gradients) and TRL's
``ChunkedLogProbFunction`` (per-token log-probs and gradients). Both are test dependencies."""

import liger_kernel.chunked_loss as liger_dpo
import pytest
import torch
import trl.kernels.chunked_logprob as trl_kernels
from helpers import make_linear

from fastdpo import FusedLinearDPOLoss, fused_linear_logps

LIGER_LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
]


@pytest.mark.parametrize("loss_type", LIGER_LOSS_TYPES)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_matches_liger_fused_linear_dpo(loss_type, average_log_prob):
    hidden, weight, bias, labels = make_linear(6, 9, 16, 53)
    ref_hidden, ref_weight, ref_bias, _ = make_linear(6, 9, 16, 53, seed=4)
    options = dict(beta=0.2, loss_type=loss_type, average_log_prob=average_log_prob)

    ours = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    out = FusedLinearDPOLoss(**options)(
        ours[0],
        ours[1],
        labels,
        bias=ours[2],
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )
    out.loss.backward()

    # Liger does not shift: it takes the hidden states and labels already aligned.
    theirs = [z.clone().requires_grad_(True) for z in (hidden, weight, bias)]
    liger = liger_dpo.LigerFusedLinearDPOLoss(compiled=False, **options)
    loss, aux = liger(
        theirs[1], theirs[0][:, :-1], labels[:, 1:], theirs[2], ref_hidden[:, :-1], ref_weight, ref_bias
    )
    loss.backward()
    chosen_logps, rejected_logps, *_, chosen_rewards, rejected_rewards = aux

    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.policy_chosen_logps, chosen_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.policy_rejected_logps, rejected_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("hidden", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_trl_chunked_logprob(with_bias):
    hidden, weight, bias, labels = make_linear(4, 11, 16, 77, bias=with_bias)
    gen = torch.Generator().manual_seed(3)
    w_tok = torch.randn(4, 10, generator=gen)

    ours = [z.clone().requires_grad_(True) if z is not None else None for z in (hidden, weight, bias)]
    out = fused_linear_logps(ours[0], ours[1], labels, bias=ours[2], row_tile=8, vocab_tile=32)
    (out.token_logps * w_tok).sum().backward()

    # As TRL's trainer calls it: shifted rows, every position scored, the ignored ones masked after.
    theirs = [z.clone().requires_grad_(True) if z is not None else None for z in (hidden, weight, bias)]
    target = labels[:, 1:]
    mask = target != -100
    rows, flat_target = theirs[0][:, :-1].reshape(-1, 16), target.clamp(min=0).reshape(-1)
    # (hidden, weight, bias, labels, temperature, chunk width, then TRL's defaults)
    out_trl = trl_kernels.ChunkedLogProbFunction.apply(
        rows, theirs[1], theirs[2], flat_target, 1.0, 32, None, 1.0, ()
    )
    per_token = out_trl[0].view(4, 10) * mask
    (per_token * w_tok).sum().backward()

    torch.testing.assert_close(out.token_logps, per_token, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
