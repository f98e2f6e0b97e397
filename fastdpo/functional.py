"""Preference losses: pure functions of per-sequence log-probs, named and defined as in TRL 1.16.

Follows TRL 1.16.0's ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py) and, for ``simpo``,
its ``CPOTrainer.cpo_loss`` (trl/experimental/cpo/cpo_trainer.py). With ``h_c = pi_c - ref_c``,
``h_r = pi_r - ref_r`` and ``d = s(h_c) - s(h_r)`` (``s`` = the f-divergence score, the identity by
default); docs/design.md has the table of formulas. Rewards are ``beta * h``, detached.

Deliberate differences from TRL 1.16 (each also in docs/design.md):
- ``sigmoid`` with ``label_smoothing > 0`` is conservative DPO (cDPO); TRL 1.16 ignores the smoothing.
- ``simpo`` with ``label_smoothing > 0`` is smoothed as TRL's CPO trainer smooths it.
- Length-normalised losses divide by the number of *scored* completion tokens (the counts given);
  TRL 1.16 counts the completion mask before the shift, one more token when a completion starts at
  position 0, whose token no logit scores.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "sigmoid_norm",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "aot_pair",  # older TRL name of aot_unpaired
    "apo_zero",
    "apo_down",
    "discopop",
    "simpo",
    "sft",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# As in TRL: other divergences only make sense for losses built on the (normalised) score difference.
F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
LOGP_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(u) of the policy/reference ratio u = exp(logratios) (f-DPO, Wang et al. 2023, arXiv 2309.16240)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence: (u^(alpha-1) - 1) / (alpha-1), reverse KL in the limit alpha -> 1
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    # At least float32 (float64 stays float64); the clamp keeps exp finite in the output dtype, as TRL's.
    compute = torch.promote_types(logratios.dtype, torch.float32)
    limit = 11.0 if logratios.dtype == torch.float16 else 80.0
    t = torch.clamp((alpha - 1.0) * logratios.to(compute), max=limit)
    return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratios.dtype)


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-log sigmoid(z)`` when the label is right with probability ``1 - eps`` (cDPO's smoothing)."""
    if eps == 0:  # no 0 * inf = nan for an infinite margin
        return -F.logsigmoid(z)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _one_loss(loss_type: str, beta: float, eps: float, t: dict, opts: dict) -> torch.Tensor:
    """Per-pair loss [B] of one loss type; ``t`` holds the shared intermediate tensors."""
    h_c, h_r, d = t["h_c"], t["h_r"], t["d"]
    if loss_type == "sigmoid":
        # DPO, Rafailov et al. 2023 (arXiv 2305.18290) eq. 7; eps > 0: cDPO (Mitchell 2023, ericmitchell.ai/cdpo.pdf)
        return _smoothed_sigmoid(beta * d, eps)
    if loss_type == "robust":
        # Provably robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409): unbiased under label flips w.p. eps
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        # SLiC, Zhao et al. 2023 (arXiv 2305.10425) sec. 2; on the normalised likelihood as in RSO (arXiv 2309.06657)
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        # IPO, Azar et al. 2023 (arXiv 2310.12036) eq. 17, on per-token mean log-ratios as in TRL
        return (t["s_c"] / t["n_c"] - t["s_r"] / t["n_r"] - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        # Length-normalised DPO: "DPO w/ LN" of SimPO (arXiv 2405.14734), as used by Tulu 3 (arXiv 2411.15124)
        return -F.logsigmoid(beta * (t["s_c"] / t["n_c"] - t["s_r"] / t["n_r"]))
    if loss_type == "exo_pair":
        # EXO, Ji et al. 2024 (arXiv 2402.00856) eq. 16: reverse KL to the smoothed label [1 - eps, eps]
        z = beta * d
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if loss_type == "nca_pair":
        # NCA, Chen et al. 2024 (arXiv 2402.05369): pairwise noise-contrastive alignment
        return -F.logsigmoid(beta * h_c) - 0.5 * F.logsigmoid(-beta * h_c) - 0.5 * F.logsigmoid(-beta * h_r)
    if loss_type == "bco_pair":
        # BCO, Jung et al. 2024 (arXiv 2404.04656): chosen -> 1, rejected -> 0, TRL's paired form
        return -F.logsigmoid(beta * h_c) - F.logsigmoid(-beta * h_r)
    if loss_type == "sppo_hard":
        # SPPO, Wu et al. 2024 (arXiv 2405.00675) eq. 4.7 with hard probabilities (1 winner, 0 loser)
        return (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2
    if loss_type == "aot":
        # AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired: sorted policy vs sorted reference margins
        pi_c, pi_r, ref_c, ref_r = t["pi_c"], t["pi_r"], t["ref_c"], t["ref_r"]
        delta = torch.sort(pi_c - pi_r, dim=0).values - torch.sort(ref_c - ref_r, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type in ("aot_unpaired", "aot_pair"):
        # AOT, Melnyk et al. 2024 (arXiv 2406.05882), unpaired: sorted chosen vs sorted rejected ratios
        delta = torch.sort(h_c, dim=0).values - torch.sort(h_r, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "apo_zero":
        # APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 7
        return 1 - torch.sigmoid(beta * h_c) + torch.sigmoid(beta * h_r)
    if loss_type == "apo_down":
        # APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266) eq. 8
        return torch.sigmoid(beta * h_c) + 1 - torch.sigmoid(beta * d)
    if loss_type == "discopop":
        # DiscoPOP (log-ratio modulated loss), Chris Lu et al. 2024 (arXiv 2406.08414) eq. 5
        z = beta * d
        m = torch.sigmoid(z / opts["discopop_tau"])
        return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    if loss_type == "simpo":
        # SimPO, Meng et al. 2024 (arXiv 2405.14734); eps > 0 smoothed as TRL's CPO trainer does
        z = beta * (t["pi_c"] / t["n_c"] - t["pi_r"] / t["n_r"]) - opts["simpo_gamma"]
        return _smoothed_sigmoid(z, eps)
    if loss_type == "sft":
        # NLL of the chosen completions (RPO, Pang et al. 2024, arXiv 2404.19733): the mean over every
        # chosen token of the batch, spread over the pairs.
        nll = -t["token_sum_c"].sum() / t["tokens_c"].sum().clamp(min=1)
        return nll.expand_as(t["pi_c"])
    raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")


def check_number(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float: a TypeError unless a real number, a ValueError unless finite (and > 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


def check_loss_options(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
) -> tuple[list[str], list[float]]:
    """Validate the options shared by ``preference_loss`` and ``DPOLoss``; return (types, weights)."""
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, Sequence) and all(isinstance(name, str) for name in loss_type):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a loss name or a list of them, got {loss_type!r}")
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for name in types:
        if name not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; choose from {LOSS_TYPES}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    elif isinstance(loss_weights, Sequence) and not isinstance(loss_weights, str):
        weights = [check_number(f"loss_weights[{k}]", w) for k, w in enumerate(loss_weights)]
    else:
        raise TypeError(f"loss_weights must be a list of numbers, got {type(loss_weights).__name__}")
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    beta = check_number("beta", beta, positive=True)
    eps = check_number("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
    if "robust" in types and eps >= 0.5:
        raise ValueError("loss_type 'robust' needs label_smoothing < 0.5 (it divides by 1 - 2*eps)")
    if "exo_pair" in types and eps <= 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (1e-3 is the usual choice)")
    if not isinstance(f_divergence_type, str) or f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose from {F_DIVERGENCES}")
    if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
        raise ValueError(
            f"f_divergence_type {f_divergence_type!r} works only with {sorted(F_DIVERGENCE_LOSSES)}, got {types}"
        )
    check_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_number("discopop_tau", discopop_tau, positive=True)
    check_number("simpo_gamma", simpo_gamma)
    return types, weights


def _check_logps(tensors: Sequence[torch.Tensor]) -> None:
    """The four log-prob tensors: floating, one ``[B]`` shape with ``B >= 1``, one device."""
    for name, x in zip(LOGP_NAMES, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be [B] (one value per pair), got shape {tuple(x.shape)}")
        if x.device != tensors[0].device:
            raise ValueError(f"{name} is on {x.device} but {LOGP_NAMES[0]} is on {tensors[0].device}")
    shapes = [tuple(x.shape) for x in tensors]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"the four log-prob tensors must share one [B] shape, got {dict(zip(LOGP_NAMES, shapes))}"
        )
    if shapes[0][0] == 0:
        raise ValueError("empty batch: the log-prob tensors hold no pairs (B = 0)")


def _check_like(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    """A floating ``[B]`` tensor on the device of ``like``."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
    if tuple(x.shape) != tuple(like.shape) or x.device != like.device:
        raise ValueError(
            f"{name} must be [B] = {list(like.shape)} on {like.device}, got {tuple(x.shape)} on {x.device}"
        )


def _check_counts(name: str, counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Token counts ``[B]`` (integer or float) on the log-probs' device, as the log-probs' dtype."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype == torch.bool or counts.dtype.is_complex:
        raise TypeError(f"{name} must hold token counts (integer or float), got {counts.dtype}")
    if tuple(counts.shape) != tuple(like.shape):
        raise ValueError(
            f"{name} must be [B] = {list(like.shape)} like the log-probs, got {tuple(counts.shape)}"
        )
    if counts.device != like.device:
        raise ValueError(f"{name} is on {counts.device} but the log-probs are on {like.device}")
    return counts.to(like.dtype)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
    average_log_prob: bool = False,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    sft_chosen_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` and rewards ``beta * (pi - ref)`` (detached) from ``[B]`` log-probs.

    The four log-probs are floating ``[B]`` tensors on one device, summed over each completion's
    scored tokens. ``chosen_counts`` / ``rejected_counts`` (``[B]``, both or neither) are those
    token counts: ``ipo``, ``sigmoid_norm`` and ``simpo`` divide by them, ``sft`` is the NLL summed
    over the chosen tokens divided by their total. Without counts every count is 1 (the log-probs
    are already per-token means). With ``average_log_prob=True`` the log-probs given are per-token
    means over the counts: the length-normalised losses use them as they are, and ``sft`` still
    takes the token mean over all chosen tokens (``sum_i count_i * mean_i / sum_i count_i``), not a
    mean of per-row means. A list ``loss_type`` gives ``sum_k loss_weights[k] * loss_k``.
    ``sft_chosen_logps`` (``[B]``, summed like the log-probs) replaces ``policy_chosen_logps`` in
    the ``sft`` term only: LD-DPO (``ld_alpha``) reweights the log-probs of the preference losses,
    while TRL's ``sft`` stays the plain NLL of the chosen tokens.

    ``sigmoid`` and ``simpo`` with ``label_smoothing > 0`` are smoothed (cDPO; TRL's CPO trainer);
    TRL 1.16's ``DPOTrainer`` ignores the smoothing for ``sigmoid``. Each bad argument is a
    TypeError/ValueError that names it.
    """
    more = dict(
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, simpo_gamma=simpo_gamma
    )
    types, weights = check_loss_options(
        loss_type, loss_weights, beta, label_smoothing, f_divergence_type, **more
    )
    beta, label_smoothing = float(beta), float(label_smoothing)
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_logps(tensors)
    if (chosen_counts is None) != (rejected_counts is None):
        raise ValueError("give both chosen_counts and rejected_counts, or neither")
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob must be True or False, got {average_log_prob!r}")
    pi_c, pi_r, ref_c, ref_r = tensors
    if chosen_counts is None:
        tokens_c = n_c = n_r = torch.ones_like(pi_c)
    else:
        tokens_c = _check_counts("chosen_counts", chosen_counts, pi_c)
        n_c = tokens_c.clamp(min=1)
        n_r = _check_counts("rejected_counts", rejected_counts, pi_r).clamp(min=1)
    # What sft needs whatever the log-probs are: the chosen tokens' log-prob sum and their number.
    if sft_chosen_logps is not None:
        _check_like("sft_chosen_logps", sft_chosen_logps, pi_c)
    sft_c = pi_c if sft_chosen_logps is None else sft_chosen_logps
    token_sum_c = sft_c * tokens_c if average_log_prob else sft_c
    if average_log_prob:  # already per-token means: the length-normalised losses divide by 1
        n_c = n_r = torch.ones_like(pi_c)
    h_c, h_r = pi_c - ref_c, pi_r - ref_r
    s_c = _scores(h_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = _scores(h_r, f_divergence_type, f_alpha_divergence_coef)
    shared = dict(pi_c=pi_c, pi_r=pi_r, ref_c=ref_c, ref_r=ref_r, h_c=h_c, h_r=h_r, d=s_c - s_r)
    shared.update(s_c=s_c, s_r=s_r, n_c=n_c, n_r=n_r, token_sum_c=token_sum_c, tokens_c=tokens_c)
    opts = {"discopop_tau": float(discopop_tau), "simpo_gamma": float(simpo_gamma)}
    losses = sum(w * _one_loss(name, beta, label_smoothing, shared, opts) for name, w in zip(types, weights))
    return losses, (beta * h_c).detach(), (beta * h_r).detach()


# ---------------------------------------------------------------------------- token-level options
# TRL 1.16's DPOTrainer reads per-token log-probs for two options; these are its formulas on
# fastdpo's per-token outputs (0 at every ignored position, so a sum over the row is a sum over
# the scored tokens).


def check_ld_alpha(ld_alpha) -> float | None:
    """``ld_alpha`` as a float in ``[0, 1]``, or None (LD-DPO off)."""
    if ld_alpha is None:
        return None
    if isinstance(ld_alpha, bool) or not isinstance(ld_alpha, numbers.Real):
        raise TypeError(
            f"ld_alpha must be None or a number in [0, 1], got {type(ld_alpha).__name__} {ld_alpha!r}"
        )
    if not 0.0 <= float(ld_alpha) <= 1.0:  # also refuses nan
        raise ValueError(
            f"ld_alpha must be in [0, 1] (1: plain DPO, 0: the shared prefix only), got {ld_alpha}"
        )
    return float(ld_alpha)


def check_use_weighting(use_weighting, loss_types: Sequence[str]) -> None:
    """``use_weighting`` a bool, and not with the losses that sort the batch (as TRL refuses them)."""
    if not isinstance(use_weighting, bool):
        raise TypeError(
            f"use_weighting must be True or False, got {type(use_weighting).__name__} {use_weighting!r}"
        )
    sorting = sorted(set(loss_types) & {"aot", "aot_unpaired", "aot_pair"})
    if use_weighting and sorting:
        raise ValueError(
            f"use_weighting=True does not work with loss_type {sorting}: they sort the pairs, "
            "which would misalign the per-pair weights (TRL refuses them too)"
        )


def length_desensitized_logps(
    token_logps: torch.Tensor, counted: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """LD-DPO's ``[2B]`` log-probs (Liu et al. 2024, arXiv 2409.06411), as TRL 1.16 computes them.

    ``token_logps`` ``[2B, T']`` (chosen rows, then rejected), ``counted`` ``[2B, T']`` bool (the
    scored tokens). Each pair shares ``l = min(chosen tokens, rejected tokens)``: in each of its two
    rows the first ``l`` scored tokens (the "public" part) count fully and the rest (the "verbose"
    part) by ``ld_alpha``. Differentiable in ``token_logps``.
    """
    position = counted.long().cumsum(-1)  # 1-based index among the scored tokens (TRL's comp_pos)
    chosen, rejected = counted.sum(-1).chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
    public = counted & (position <= shared)
    verbose = counted & (position > shared)
    return (token_logps * public).sum(-1) + ld_alpha * (token_logps * verbose).sum(-1)


def wpo_weights(
    token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """WPO's ``[B]`` pair weights (Zhou et al. 2024, arXiv 2406.11827, eq. 2, as TRL 1.16): per row
    ``w = exp(mean over scored tokens of (log p(token) - log sum_v p_v^2))``, the chosen row's
    weight times the rejected row's. ``[2B, T']`` inputs (0 at ignored positions), ``counts``
    ``[2B]``; no gradient flows through the weights."""
    with torch.no_grad():
        aligned = (token_logps.detach() - log_sum_sq_probs).sum(-1) / counts.clamp(min=1)
        chosen, rejected = torch.exp(aligned).chunk(2)
        return chosen * rejected
