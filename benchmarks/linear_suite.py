"""The ``linear`` suite: the DPO loss from hidden states and the LM head, without or with logits.

Inputs ``{"hidden", "weight", "ref_hidden", "labels"}``: the policy's ``[2 * pairs, T, H]`` hidden
states and a ``[V, H]`` LM head (both get gradients), a reference model's hidden states through
the same head (no gradient), ~30% of labels ignored. Every method returns the sigmoid DPO loss
(beta 0.1, causal shift) and the policy's per-sequence log-probs.

- ``fastdpo-fused-linear``: ``FusedLinearDPOLoss`` (tile kernels from the native backend);
  ``fastdpo-fused-linear-torch`` the same with the pure-torch tile kernels.
- ``unfused-naive``: the LM-head matmul in the model's dtype, then the naive log-probs
  (float32 ``log_softmax`` of all the logits, gather, mask, sum) and the loss; the baseline.
- ``unfused-native``: the LM-head matmul in the model's dtype, then ``DPOLoss`` on the logits
  (native kernel, in-place backward): the best the logits API can do (``unfused-torch`` where
  the native backend is not built).
- ``trl-chunked-logprob``: TRL 1.16's ``ChunkedLogProbFunction``, called the way TRL's
  ``DPOTrainer`` calls it on CPU (``add_fused_lm_head``: every shifted position projected,
  chunk width 32768, ignored positions masked afterwards), then the same DPO loss.
- ``liger-fused-linear-dpo``: Liger's ``LigerFusedLinearDPOLoss`` with its defaults (chunks of
  one pair, ``torch.compile``), given the shifted hidden states and labels (it does not shift);
  ``liger-fused-linear-dpo-eager`` the same with ``compiled=False``.
"""

from __future__ import annotations

import torch

import fastdpo
from benchmarks.ground_truth import float64_linear_sequence_logps, make_linear
from benchmarks.suite import DTYPES, Inputs, Output, Shape, Suite
from fastdpo.naive import naive_sequence_logps

BETA = 0.1
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def bf16_matmul_is_native() -> bool:
    """Whether this CPU runs bfloat16 matmuls at speed (oneDNN bf16 support)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def slow_dtypes() -> dict[str, str]:
    if bf16_matmul_is_native():
        return {}
    return {
        "bfloat16": "this CPU has no native bfloat16 matmul (oneDNN bf16), so the bf16 peers' "
        "matmuls are tens of times slower than float32 ones"
    }


def make_inputs(shape: Shape, dtype: str, seed: int = 0) -> Inputs:
    pairs, t, h, v = shape
    dt = DTYPES[dtype]
    hidden, weight, _, labels = make_linear(
        2 * pairs, t, h, v, dt, bias=False, seed=seed, weight_scale=h**-0.5
    )
    noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1))
    ref_hidden = (hidden.float() + 0.1 * noise).to(dt)
    return {"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "labels": labels}


def logits_bytes(shape: Shape, dtype: str) -> int:
    """What the ``[2 * pairs, T, V]`` logits would take in the model's dtype."""
    pairs, t, _, v = shape
    return 2 * pairs * t * v * DTYPES[dtype].itemsize


def returned_grad_bytes(x: Inputs) -> int:
    """The gradients every method returns: hidden states and LM head."""
    return sum(x[k].numel() * x[k].element_size() for k in ("hidden", "weight"))


def _policy_logps(out) -> torch.Tensor:
    return torch.cat([out.policy_chosen_logps, out.policy_rejected_logps])


def _fastdpo(backend: str, **options):
    loss_fn = fastdpo.FusedLinearDPOLoss(beta=BETA, backend=backend, **options)

    def run(x: Inputs) -> Output:
        out = loss_fn(x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"])
        return Output(out.loss, _policy_logps(out))

    return run


def unfused(backend: str):
    """The LM-head matmul in the model's dtype, then ``DPOLoss`` on the logits (in-place backward)."""
    loss_fn = fastdpo.DPOLoss(beta=BETA, backend=backend, inplace_backward=True)

    def run(x: Inputs) -> Output:
        with torch.no_grad():
            ref_logps = fastdpo.sequence_logps(x["ref_hidden"] @ x["weight"].T, x["labels"], backend=backend)
        out = loss_fn(x["hidden"] @ x["weight"].T, x["labels"], ref_logps=ref_logps)
        return Output(out.loss, _policy_logps(out))

    return run


def _unfused_naive(x: Inputs) -> Output:
    with torch.no_grad():
        ref = naive_sequence_logps(x["ref_hidden"] @ x["weight"].T, x["labels"])
    policy = naive_sequence_logps(x["hidden"] @ x["weight"].T, x["labels"])
    losses, _, _ = fastdpo.preference_loss(*policy.chunk(2), *ref.chunk(2), beta=BETA)
    return Output(losses.mean(), policy)


def _trl_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    target = labels[:, 1:]
    mask = target != -100
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    per_token = ChunkedLogProbFunction.apply(
        rows, weight, None, target.clamp(min=0).reshape(-1), 1.0, TRL_CHUNK, None, 1.0, ()
    )[0]
    return (per_token.view(mask.shape) * mask).sum(-1)


def _trl(x: Inputs) -> Output:
    with torch.no_grad():
        ref = _trl_sequence_logps(x["ref_hidden"], x["weight"], x["labels"])
    policy = _trl_sequence_logps(x["hidden"], x["weight"], x["labels"])
    losses, _, _ = fastdpo.preference_loss(*policy.float().chunk(2), *ref.float().chunk(2), beta=BETA)
    return Output(losses.mean(), policy)


_liger = {}


def liger_dpo(compiled: bool):
    def run(x: Inputs) -> Output:
        if compiled not in _liger:  # built on first use: importing the suite does not import Liger
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            _liger[compiled] = LigerFusedLinearDPOLoss(beta=BETA, compiled=compiled)
        w = x["weight"]
        loss, aux = _liger[compiled](
            w, x["hidden"][:, :-1], x["labels"][:, 1:], None, x["ref_hidden"][:, :-1], w.detach()
        )
        return Output(loss, torch.cat([aux[0], aux[1]]))

    return run


def _methods() -> dict:
    native = "native" in fastdpo.available_backends("cpu")
    methods = {}
    if native:  # the C++ fused linear kernel: within its memory budget, then always recomputing
        methods["fastdpo-fused-linear"] = _fastdpo("native")
        methods["fastdpo-fused-linear-recompute"] = _fastdpo("native", memory_budget_mib=0)
    methods["fastdpo-fused-linear-torch"] = _fastdpo("torch")
    methods["unfused-naive"] = _unfused_naive
    backend = "native" if native else "torch"
    methods[f"unfused-{backend}"] = unfused(backend)
    return methods


SUITE = Suite(
    name="linear",
    description="DPO loss from `[2x{pairs}, T, H]` hidden states and a `[V, H]` LM head "
    "(policy + reference), forward+backward",
    dims=("pairs", "seq_len", "hidden", "vocab"),
    make_inputs=make_inputs,
    grad_inputs=("hidden", "weight"),
    ground_truth=lambda x: float64_linear_sequence_logps(x["hidden"], x["weight"], x["labels"]),
    logits_bytes=logits_bytes,
    baseline="unfused-naive",
    methods=_methods(),
    peers={
        "trl-chunked-logprob": ("trl", _trl),
        "liger-fused-linear-dpo": ("liger_kernel", liger_dpo(compiled=True)),
        "liger-fused-linear-dpo-eager": ("liger_kernel", liger_dpo(compiled=False)),
    },
    # (pairs, T, H, V): full are the fused-linear issue's shapes.
    shapes={
        "quick": {"h256-v32k": (2, 64, 256, 32000)},
        "full": {"h1024-v32k": (2, 512, 1024, 32000), "h2048-v128k": (2, 1024, 2048, 128256)},
    },
    sweeps={
        "quick": dict(
            hidden=256,
            vocabs=[32000, 128256],
            seq_lens=[64, 128],
            fixed_seq=64,
            fixed_vocab=32000,
            rounds=3,
        ),
        "full": dict(
            hidden=2048,
            vocabs=[32000, 128256, 256000],
            seq_lens=[256, 512, 1024, 2048],
            fixed_seq=1024,
            fixed_vocab=128256,
            rounds=3,
        ),
    },
    returned_grad_bytes=returned_grad_bytes,
    slow_dtypes=slow_dtypes,
)
