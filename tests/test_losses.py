"""preference_loss: each loss type against a hand computation in plain Python floats; DPOLoss and
FusedLinearDPOLoss with the sft term against plain PyTorch, as Liger's DPO tests check theirs."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fastdpo import LOSS_TYPES, DPOLoss, FusedLinearDPOLoss, preference_loss

# Two pairs: (pi_c, pi_r, ref_c, ref_r, n_c, n_r)
PAIRS = [(-10.0, -14.0, -11.0, -12.5, 4, 7), (-20.0, -18.0, -19.5, -19.0, 5, 3)]
BETA, EPS = 0.5, 0.1


def logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z):
    return 1 / (1 + math.exp(-z))


def hand(loss_type, pi_c, pi_r, ref_c, ref_r, n_c, n_r, *, beta=BETA, eps=EPS):
    """The docs/design.md table, one pair at a time, in plain floats (not aot/sft: batch-level)."""
    h_c, h_r = pi_c - ref_c, pi_r - ref_r
    d = h_c - h_r
    z = beta * d
    return {
        "sigmoid": -(1 - eps) * logsig(z) - eps * logsig(-z),
        "robust": (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - z),
        "ipo": (h_c / n_c - h_r / n_r - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": -logsig(beta * (h_c / n_c - h_r / n_r)),
        "exo_pair": sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)),
        "nca_pair": -logsig(beta * h_c) - 0.5 * logsig(-beta * h_c) - 0.5 * logsig(-beta * h_r),
        "bco_pair": -logsig(beta * h_c) - logsig(-beta * h_r),
        "sppo_hard": (h_c - 1 / (2 * beta)) ** 2 + (h_r + 1 / (2 * beta)) ** 2,
        "apo_zero": 1 - sig(beta * h_c) + sig(beta * h_r),
        "apo_down": sig(beta * h_c) + 1 - sig(z),
        "discopop": (1 - sig(z / 0.05)) * -logsig(z) + sig(z / 0.05) * math.exp(-z),
        "simpo": -(1 - eps) * logsig(beta * (pi_c / n_c - pi_r / n_r) - 0.5)
        - eps * logsig(-(beta * (pi_c / n_c - pi_r / n_r) - 0.5)),
    }[loss_type]


def run(loss_type, **kw):
    cols = list(zip(*PAIRS))
    pi_c, pi_r, ref_c, ref_r = (torch.tensor(c, dtype=torch.float64) for c in cols[:4])
    n_c, n_r = (torch.tensor(c) for c in cols[4:])
    kw.setdefault("beta", BETA)
    kw.setdefault("label_smoothing", EPS)
    return preference_loss(
        pi_c, pi_r, ref_c, ref_r, loss_type=loss_type, chosen_counts=n_c, rejected_counts=n_r, **kw
    )


PER_PAIR = (
    "sigmoid robust hinge ipo sigmoid_norm exo_pair nca_pair bco_pair sppo_hard apo_zero apo_down discopop"
)
PER_PAIR = PER_PAIR.split() + ["simpo"]


@pytest.mark.parametrize("loss_type", PER_PAIR)
def test_per_pair_losses_match_hand_computation(loss_type):
    losses, chosen_rewards, rejected_rewards = run(loss_type)
    expected = [hand(loss_type, *p) for p in PAIRS]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(
        chosen_rewards, torch.tensor([BETA * (p[0] - p[2]) for p in PAIRS], dtype=torch.float64)
    )
    torch.testing.assert_close(
        rejected_rewards, torch.tensor([BETA * (p[1] - p[3]) for p in PAIRS], dtype=torch.float64)
    )


def test_sigmoid_without_smoothing_is_the_dpo_paper_loss():
    # pair 0: h_c = 1, h_r = -1.5, d = 2.5; beta 0.5 -> -log sigmoid(1.25)
    losses, _, _ = run("sigmoid", label_smoothing=0.0)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-1.25)), rel=1e-12)


# --- deliberate differences from TRL 1.16 (docs/design.md) -----------------------------------


def test_sigmoid_with_label_smoothing_is_conservative_dpo_not_plain_dpo():
    """TRL 1.16's DPOTrainer computes -logsigmoid(beta d) whatever label_smoothing is; fastdpo's
    sigmoid with eps > 0 is cDPO, -(1-eps) logsig(beta d) - eps logsig(-beta d)."""
    smoothed, _, _ = run("sigmoid", label_smoothing=0.1)
    trl_116 = [-logsig(BETA * ((p[0] - p[2]) - (p[1] - p[3]))) for p in PAIRS]
    cdpo = [
        -0.9 * logsig(BETA * ((p[0] - p[2]) - (p[1] - p[3])))
        - 0.1 * logsig(-BETA * ((p[0] - p[2]) - (p[1] - p[3])))
        for p in PAIRS
    ]
    torch.testing.assert_close(smoothed, torch.tensor(cdpo, dtype=torch.float64))
    assert not torch.allclose(smoothed, torch.tensor(trl_116, dtype=torch.float64))


def test_simpo_with_label_smoothing_is_smoothed_as_trl_cpo():
    """TRL's CPOTrainer: logits = (pi_c/n_c - pi_r/n_r) - gamma/beta,
    loss = -logsig(beta logits) (1 - eps) - logsig(-beta logits) eps; it used to ignore eps here."""
    losses, _, _ = run("simpo", label_smoothing=0.2, simpo_gamma=0.3)
    expected = []
    for pi_c, pi_r, _, _, n_c, n_r in PAIRS:
        logits = (pi_c / n_c - pi_r / n_r) - 0.3 / BETA
        expected.append(-logsig(BETA * logits) * 0.8 - logsig(-BETA * logits) * 0.2)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    unsmoothed, _, _ = run("simpo", label_smoothing=0.0, simpo_gamma=0.3)
    assert not torch.allclose(losses, unsmoothed)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_divide_by_scored_tokens(loss_type):
    """A completion that starts at position 0 has T labels but T - 1 scored ones (no logit scores
    the first); TRL 1.16 divides by T, fastdpo by T - 1."""
    gen = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(4, 6, 11, generator=gen), torch.randn(4, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (4, 6), generator=gen)
    labels[1, :2] = labels[3, :3] = -100  # rows 0 and 2 start at position 0
    out = DPOLoss(loss_type=loss_type, beta=0.5)(logits, labels, ref_logits)

    def h(x):
        logps = torch.log_softmax(x[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        return (logps.squeeze(-1) * (labels[:, 1:] != -100)).sum(-1)

    ratio = h(logits) - h(ref_logits)
    scored = (labels[:, 1:] != -100).sum(-1)
    assert scored.tolist() == [5, 4, 5, 3]
    margin = ratio[:2] / scored[:2] - ratio[2:] / scored[2:]
    expected = (margin - 1 / (2 * 0.5)) ** 2 if loss_type == "ipo" else -F.logsigmoid(0.5 * margin)
    torch.testing.assert_close(out.loss.double(), expected.mean(), atol=1e-6, rtol=1e-5)
    trl_counts = (labels != -100).sum(-1)  # TRL 1.16's completion mask, before the shift
    assert trl_counts.tolist() == [6, 4, 6, 3]


def test_aot_sorts_over_the_batch():
    losses, _, _ = run("aot")
    # pi_c - pi_r = [4, -2] -> sorted [-2, 4]; ref_c - ref_r = [1.5, -0.5] -> sorted [-0.5, 1.5]
    deltas = [-2 - -0.5, 4 - 1.5]
    expected = [-(1 - EPS) * logsig(BETA * x) - EPS * logsig(-BETA * x) for x in deltas]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name", ["aot_unpaired", "aot_pair"])
def test_aot_unpaired_sorts_chosen_and_rejected_ratios(name):
    losses, _, _ = run(name)
    # h_c = [1, -0.5] -> [-0.5, 1]; h_r = [-1.5, 1] -> [-1.5, 1]
    deltas = [-0.5 - -1.5, 1 - 1]
    expected = [-(1 - EPS) * logsig(BETA * x) - EPS * logsig(-BETA * x) for x in deltas]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


def test_sft_is_mean_nll_of_chosen_tokens():
    losses, _, _ = run("sft")
    expected = (10.0 + 20.0) / (4 + 5)
    torch.testing.assert_close(losses, torch.tensor([expected, expected], dtype=torch.float64))


def test_sft_is_the_token_mean_when_log_probs_are_averages():
    cols = list(zip(*PAIRS))
    n_c, n_r = (torch.tensor(c, dtype=torch.float64) for c in cols[4:])
    means = [torch.tensor(c, dtype=torch.float64) / n for c, n in zip(cols[:4], (n_c, n_r, n_c, n_r))]
    losses, _, _ = preference_loss(
        *means, loss_type="sft", chosen_counts=n_c, rejected_counts=n_r, average_log_prob=True
    )
    expected = (10.0 + 20.0) / (4 + 5)  # not (10/4 + 20/5) / 2, the mean of per-row means
    torch.testing.assert_close(losses, torch.tensor([expected, expected], dtype=torch.float64))


def test_sft_token_mean_does_not_count_a_row_without_tokens():
    pi_c, zeros = torch.tensor([0.0, -20.0]), torch.zeros(2)
    counts = torch.tensor([0, 5])
    losses, _, _ = preference_loss(
        pi_c, zeros, zeros, zeros, loss_type="sft", chosen_counts=counts, rejected_counts=counts
    )
    torch.testing.assert_close(losses, torch.tensor([4.0, 4.0]))  # 20 / 5, not 20 / 6


def test_list_of_loss_types_is_weighted_sum():
    losses, _, _ = run(["sigmoid", "sft"], loss_weights=[0.8, 0.2])
    sft = (10.0 + 20.0) / 9
    expected = [0.8 * hand("sigmoid", *p) + 0.2 * sft for p in PAIRS]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


def test_every_loss_type_is_covered_by_a_test():
    batch_level = {"aot", "aot_unpaired", "aot_pair", "sft"}
    assert set(LOSS_TYPES) == set(PER_PAIR) | batch_level


@pytest.mark.parametrize(
    "f_div, score",
    [
        ("forward_kl", lambda h: 1 - math.exp(-h)),
        ("js_divergence", lambda h: math.log(2) + logsig(h)),
        ("alpha_divergence", lambda h: (math.exp(-0.5 * h) - 1) / -0.5),  # alpha = 0.5
    ],
)
def test_f_divergences_transform_the_log_ratios(f_div, score):
    losses, _, _ = run("sigmoid", label_smoothing=0.0, f_divergence_type=f_div)
    expected = []
    for pi_c, pi_r, ref_c, ref_r, _, _ in PAIRS:
        expected.append(-logsig(BETA * (score(pi_c - ref_c) - score(pi_r - ref_r))))
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


def test_alpha_divergence_of_one_is_reverse_kl():
    a, _, _ = run("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    b, _, _ = run("sigmoid")
    torch.testing.assert_close(a, b)


def test_losses_are_differentiable():
    pi = torch.tensor([-3.0, -4.0, -5.0, -2.0], requires_grad=True)
    ref = torch.tensor([-3.5, -4.0, -4.0, -2.5])
    losses, cr, rr = preference_loss(pi[:2], pi[2:], ref[:2], ref[2:], beta=0.1)
    losses.mean().backward()
    assert pi.grad is not None and torch.isfinite(pi.grad).all() and (pi.grad != 0).all()
    assert not cr.requires_grad and not rr.requires_grad


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"loss_type": "nope"}, ValueError, "unknown loss_type"),
        ({"loss_type": ["sigmoid", "nope"]}, ValueError, "unknown loss_type"),
        ({"loss_type": []}, ValueError, "at least one"),
        ({"loss_type": 5}, TypeError, "loss_type"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, ValueError, "loss_weights"),
        ({"loss_weights": [NAN]}, ValueError, r"loss_weights\[0\]"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, INF]}, ValueError, r"loss_weights\[1\]"),
        ({"loss_weights": ["0.5"]}, TypeError, r"loss_weights\[0\]"),
        ({"loss_weights": 1.0}, TypeError, "loss_weights"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": INF}, ValueError, "beta"),
        ({"beta": NAN}, ValueError, "beta"),
        ({"beta": "0.1"}, TypeError, "beta"),
        ({"beta": None}, TypeError, "beta"),
        ({"beta": True}, TypeError, "beta"),
        ({"label_smoothing": 0.7}, ValueError, "label_smoothing"),
        ({"label_smoothing": NAN}, ValueError, "label_smoothing"),
        ({"label_smoothing": "0"}, TypeError, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, "robust"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, ValueError, "exo_pair"),
        ({"f_divergence_type": "tv"}, ValueError, "f_divergence_type"),
        ({"f_divergence_type": None}, ValueError, "f_divergence_type"),
        ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, ValueError, "works only with"),
        ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": INF}, ValueError, "f_alpha"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, "discopop_tau"),
        ({"loss_type": "discopop", "discopop_tau": "0.05"}, TypeError, "discopop_tau"),
        ({"loss_type": "simpo", "simpo_gamma": NAN}, ValueError, "simpo_gamma"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    x = torch.zeros(2)
    with pytest.raises(error, match=match):
        preference_loss(x, x, x, x, **kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="share one"):
        preference_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def _zeros_but(position, value, n=2):
    return [value if k == position else torch.zeros(n) for k in range(4)]


@pytest.mark.parametrize(
    "position, value, error, match",
    [
        (0, [0.0, 0.0], TypeError, "policy_chosen_logps must be a torch.Tensor"),
        (1, torch.zeros(2, dtype=torch.long), TypeError, "policy_rejected_logps must be a floating"),
        (2, torch.zeros(2, 1), ValueError, r"ref_chosen_logps must be \[B\]"),
        (3, torch.zeros(2, device="meta"), ValueError, "ref_rejected_logps is on meta"),
    ],
)
def test_bad_logps_name_the_argument(position, value, error, match):
    with pytest.raises(error, match=match):
        preference_loss(*_zeros_but(position, value))


def test_empty_batch_raises_instead_of_nan():
    x = torch.zeros(0)
    with pytest.raises(ValueError, match="empty batch"):
        preference_loss(x, x, x, x)


@pytest.mark.parametrize(
    "chosen_counts, rejected_counts, error, match",
    [
        (torch.ones(2, 1), torch.ones(2, 1), ValueError, r"chosen_counts must be \[B\] = \[2\]"),
        (torch.ones(2), torch.ones(3), ValueError, "rejected_counts must be"),
        (torch.ones(2), None, ValueError, "both chosen_counts and rejected_counts"),
        (torch.ones(2, dtype=torch.bool), torch.ones(2), TypeError, "chosen_counts must hold token counts"),
        ([1, 1], torch.ones(2), TypeError, "chosen_counts must be a torch.Tensor"),
        (torch.ones(2), torch.ones(2, device="meta"), ValueError, "rejected_counts is on meta"),
    ],
)
def test_bad_counts_raise(chosen_counts, rejected_counts, error, match):
    """``[B, 1]`` counts used to broadcast ``ipo`` to ``[B, B]`` losses."""
    x = torch.zeros(2)
    with pytest.raises(error, match=match):
        preference_loss(
            x, x, x, x, loss_type="ipo", chosen_counts=chosen_counts, rejected_counts=rejected_counts
        )


@pytest.mark.parametrize("f_div", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_losses_pass_float64_gradcheck(f_div):
    gen = torch.Generator().manual_seed(0)
    logps = [(-5 * torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(4)]

    def loss(*x):
        return preference_loss(*x, beta=0.5, f_divergence_type=f_div, f_alpha_divergence_coef=0.3)[0]

    assert loss(*logps).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, logps)


@pytest.mark.parametrize("loss_type", PER_PAIR + ["aot", "aot_unpaired", "sft"])
def test_every_loss_type_passes_float64_gradcheck(loss_type):
    gen = torch.Generator().manual_seed(1)
    logps = [(-5 * torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    counts = torch.tensor([3, 5, 2]), torch.tensor([4, 1, 6])

    def loss(*x):
        options = dict(
            loss_type=loss_type, label_smoothing=0.1, chosen_counts=counts[0], rejected_counts=counts[1]
        )
        return preference_loss(*x, beta=0.5, **options)[0]

    assert torch.autograd.gradcheck(loss, logps)


# --- DPO + NLL with unequal chosen lengths, against plain PyTorch (Liger's test grid) -----------

CHOSEN_LENGTHS, REJECTED_LENGTHS = [2, 5, 9], [6, 3, 10]  # scored completion tokens per row


def _unequal_batch(t=12, v=17, h=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(6, t, h, generator=gen)
    ref_hidden = hidden + 0.1 * torch.randn(6, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h)
    labels = torch.randint(0, v, (6, t), generator=gen)
    for row, length in enumerate(CHOSEN_LENGTHS + REJECTED_LENGTHS):
        labels[row, : t - length] = -100  # the prompt: only the last `length` labels are scored
    return hidden, ref_hidden, weight, labels


def _plain_dpo_with_nll(logits, ref_logits, labels, beta, average, nll_weight):
    """DPO (sigmoid) + nll_weight * token-mean NLL of the chosen rows, in float64 PyTorch."""

    def sequence(x):
        logps = torch.log_softmax(x[:, :-1].double(), -1)
        target, mask = labels[:, 1:], labels[:, 1:] != -100
        per_token = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        return per_token.sum(-1) / (mask.sum(-1) if average else 1)

    pi, ref = sequence(logits), sequence(ref_logits)
    dpo = -F.logsigmoid(beta * ((pi[:3] - ref[:3]) - (pi[3:] - ref[3:]))).mean()
    chosen = logits[:3, :-1].double()
    nll = F.cross_entropy(chosen.reshape(-1, chosen.shape[-1]), labels[:3, 1:].reshape(-1), ignore_index=-100)
    return dpo + nll_weight * nll


@pytest.mark.parametrize("backend", fastdpo.available_backends("cpu"))
@pytest.mark.parametrize("average", [False, True], ids=["sum", "average"])
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "linear"])
def test_sft_term_is_token_mean_nll_with_unequal_chosen_lengths(backend, average, fused_linear):
    hidden, ref_hidden, weight, labels = _unequal_batch()
    options = dict(beta=0.2, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], average_log_prob=average)
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if fused_linear:
        out = FusedLinearDPOLoss(backend=backend, **options)(x, w, labels, ref_hidden=ref_hidden)
    else:
        out = DPOLoss(backend=backend, **options)(x @ w.T, labels, ref_hidden @ weight.T)
    out.loss.backward()

    x64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    ref_logits = ref_hidden.double() @ weight.double().T
    expected = _plain_dpo_with_nll(x64 @ w64.T, ref_logits, labels, 0.2, average, 0.7)
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
