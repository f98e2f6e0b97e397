"""The DPO-from-hidden-states methods the fused-linear benchmarks compare.

Every method computes the same thing from the same inputs: the sigmoid DPO loss (beta 0.1)
of a policy ``[2B, T, H]`` hidden states and a ``[V, H]`` LM head (both needing gradients),
against a reference model's hidden states through the same head (no gradient), with the causal
shift and ~30% of labels ignored. ``make(name)(inputs) -> (loss, policy_logps [2B])``.

- ``fastdpo-fused-linear``: ``FusedLinearDPOLoss`` (tile kernels from the native backend when
  built); ``fastdpo-fused-linear-torch`` the same with the pure-torch tile kernels.
- ``unfused-reference``: the naive pipeline: the LM-head matmul in the model's dtype, then the
  plain reference (float32 ``log_softmax`` of all the logits, gather, mask, sum) and the loss.
- ``unfused-native``: the LM-head matmul in the model's dtype, then ``DPOLoss`` on the logits
  (native kernel, in-place backward): the best the logits API can do.
- ``trl-chunked-logprob``: TRL 1.16's ``ChunkedLogProbFunction``, called the way TRL's
  ``DPOTrainer`` calls it on CPU (``add_fused_lm_head``: every shifted position projected,
  chunk width 32768, ignored positions masked afterwards), then the same DPO loss.
- ``liger-fused-linear-dpo``: Liger's ``LigerFusedLinearDPOLoss`` with its defaults (chunks of
  one pair, ``torch.compile``), given the shifted hidden states and labels (it does not shift).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

import fastdpo

IGNORE_FRACTION = 0.3
BETA = 0.1
# (pairs, T, H, V) from the fused-linear issue.
SHAPES = {"h2048-v32k": (2, 1024, 2048, 32000), "h2048-v128k": (2, 1024, 2048, 128256)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def bf16_matmul_is_native() -> bool:
    """Whether this CPU runs bfloat16 matmuls at speed (oneDNN bf16 support). Without it a bf16
    matmul is tens of times slower than a float32 one, which the bf16 peers then pay."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_inputs(shape: tuple[int, int, int, int], dtype: str, seed: int = 0) -> dict:
    pairs, t, h, v = shape
    gen = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    hidden = torch.randn(2 * pairs, t, h, generator=gen).to(dt)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(2 * pairs, t, h, generator=gen)).to(dt)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(dt)
    labels = torch.randint(0, v, (2 * pairs, t), generator=gen)
    labels[torch.rand(2 * pairs, t, generator=gen) < IGNORE_FRACTION] = -100
    return dict(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels)


def logits_bytes(inputs: dict) -> int:
    """What the ``[2B, T, V]`` logits would take in the model's dtype."""
    n, t, _ = inputs["hidden"].shape
    return n * t * inputs["weight"].shape[0] * inputs["hidden"].element_size()


def gradient_bytes(inputs: dict) -> int:
    """The gradients every method returns: hidden states and LM head."""
    return sum(inputs[k].numel() * inputs[k].element_size() for k in ("hidden", "weight"))


def _fastdpo(backend: str):
    loss_fn = fastdpo.FusedLinearDPOLoss(beta=BETA, backend=backend)

    def run(x):
        out = loss_fn(x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"])
        return out.loss, torch.cat([out.policy_chosen_logps, out.policy_rejected_logps])

    return run


def _unfused_native(x):
    loss_fn = fastdpo.DPOLoss(beta=BETA, inplace_backward=True)
    with torch.no_grad():
        ref_logps = fastdpo.sequence_logps(x["ref_hidden"] @ x["weight"].T, x["labels"])
    out = loss_fn(x["hidden"] @ x["weight"].T, x["labels"], ref_logps=ref_logps)
    return out.loss, torch.cat([out.policy_chosen_logps, out.policy_rejected_logps])


def _unfused_reference(x):
    from fastdpo.naive import naive_sequence_logps

    with torch.no_grad():
        ref = naive_sequence_logps(x["ref_hidden"] @ x["weight"].T, x["labels"])
    policy = naive_sequence_logps(x["hidden"] @ x["weight"].T, x["labels"])
    losses, _, _ = fastdpo.preference_loss(*policy.chunk(2), *ref.chunk(2), beta=BETA)
    return losses.mean(), policy


def _trl_sequence_logps(hidden, weight, labels):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    target = labels[:, 1:]
    mask = target != -100
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    per_token = ChunkedLogProbFunction.apply(
        rows, weight, None, target.clamp(min=0).reshape(-1), 1.0, TRL_CHUNK, None, 1.0, ()
    )[0]
    return (per_token.view(mask.shape) * mask).sum(-1)


def _trl(x):
    with torch.no_grad():
        ref = _trl_sequence_logps(x["ref_hidden"], x["weight"], x["labels"])
    policy = _trl_sequence_logps(x["hidden"], x["weight"], x["labels"])
    pi_c, pi_r = policy.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    losses, _, _ = fastdpo.preference_loss(
        pi_c.float(), pi_r.float(), ref_c.float(), ref_r.float(), beta=BETA
    )
    return losses.mean(), policy


_liger_loss = None


def _liger(x):
    global _liger_loss
    if _liger_loss is None:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        _liger_loss = LigerFusedLinearDPOLoss(beta=BETA)
    w = x["weight"]
    loss, aux = _liger_loss(
        w, x["hidden"][:, :-1], x["labels"][:, 1:], None, x["ref_hidden"][:, :-1], w.detach()
    )
    return loss, torch.cat([aux[0], aux[1]])


PEERS = {"trl-chunked-logprob": ("trl", _trl), "liger-fused-linear-dpo": ("liger_kernel", _liger)}


def available_methods() -> dict[str, Callable]:
    methods = {}
    native = "native" in fastdpo.available_backends("cpu")
    if native:
        methods["fastdpo-fused-linear"] = _fastdpo("native")
    methods["fastdpo-fused-linear-torch"] = _fastdpo("torch")
    methods["unfused-reference"] = _unfused_reference
    methods["unfused-native" if native else "unfused-torch"] = _unfused_native
    for name, (module, fn) in PEERS.items():
        if importlib.util.find_spec(module) is not None:
            methods[name] = fn
    return methods


def missing_methods() -> list[str]:
    return [f"{name} ({module} not installed)" for name, (module, _) in PEERS.items()
            if importlib.util.find_spec(module) is None]  # fmt: skip


def run_once(fn: Callable, inputs: dict, mode: str) -> None:
    """One call: ``forward`` (no autograd) or ``forward_backward`` (gradients of hidden and head)."""
    if mode == "forward":
        with torch.no_grad():
            fn(inputs)
        return
    for key in ("hidden", "weight"):
        inputs[key].requires_grad_(True)
    fn(inputs)[0].backward()
    for key in ("hidden", "weight"):
        inputs[key].grad = None
        inputs[key].requires_grad_(False)


def float64_policy_logps(inputs: dict, rows: int = 128) -> torch.Tensor:
    """Ground truth per-sequence log-probs of the policy in float64, a few positions at a time."""
    hidden, weight, labels = inputs["hidden"], inputs["weight"].double(), inputs["labels"]
    target = labels[:, 1:]
    out = torch.zeros(hidden.shape[0], dtype=torch.float64)
    for n in range(hidden.shape[0]):
        for t0 in range(0, target.shape[1], rows):
            y = target[n, t0 : t0 + rows]
            logits = hidden[n, t0 : t0 + rows].double() @ weight.T
            lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[n] += (lp * (y != -100)).sum()
    return out


def max_abs_error(fn: Callable, inputs: dict, exact: torch.Tensor) -> float:
    with torch.no_grad():
        return (fn(inputs)[1].double() - exact).abs().max().item()
