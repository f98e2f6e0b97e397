"""How exact the native fused linear kernel's gradients are in bfloat16 (docs/fused_linear.md).

    python -m benchmarks.linear_grad_error [--shape N T H V]

For bfloat16 inputs (hidden states, head, bias), two objectives, each against float64 on the
same inputs:

- ``sum(w * logp)`` of ``fused_linear_logps`` with random per-sequence weights (the recompute
  path), on the default operands (bfloat16 GEMM operands where the CPU has them) and with
  float32 operands forced (``FASTDPO_LINEAR_OPERANDS=float32``);
- the reference-free sigmoid DPO loss of ``FusedLinearDPOLoss`` on the chunk path, keeping
  every row (float16 kept tiles with bfloat16 operands), the default budget, and
  ``memory_budget_mib=0`` (the recompute path).

Printed per gradient: RMS and max absolute error, and both as a multiple of the error that
rounding the float64 gradient to bfloat16 makes (1.0: as exact as the output dtype allows).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.ground_truth import float64_token_logps, make_linear
from fastdpo import FusedLinearDPOLoss, fused_linear_logps
from fastdpo.backends import native_linear


def _leaves(hidden, weight, bias, dtype):
    """Fresh leaves of the inputs that take gradients, in ``dtype`` (None: as they are)."""
    x = [z.detach().clone() for z in (hidden, weight, bias)]
    return [(z if dtype is None else z.to(dtype)).requires_grad_(True) for z in x]


def _exact_sequence_logps(x, labels):
    """float64 per-sequence log-probs of ``hidden @ weight.T + bias``, differentiable."""
    return float64_token_logps(x[0] @ x[1].T + x[2], labels).sum(-1)


def gradients(hidden, weight, bias, labels, weights, dtype=torch.float64):
    """Gradients of sum(weights * sequence_logps) in float64 (``dtype``) or by the kernel (None)."""
    x = _leaves(hidden, weight, bias, dtype)
    if dtype is None:
        seq = fused_linear_logps(x[0], x[1], labels, bias=x[2], backend="native").sequence_logps
    else:
        seq = _exact_sequence_logps(x, labels)
    (seq * weights.to(seq.dtype)).sum().backward()
    return [z.grad for z in x]


def dpo_gradients(hidden, weight, bias, labels, budget=None, dtype=torch.float64):
    """Gradients of the reference-free sigmoid DPO loss (beta 0.1): in float64 (``dtype``), or by
    ``FusedLinearDPOLoss(memory_budget_mib=budget)`` (``dtype`` None)."""
    x = _leaves(hidden, weight, bias, dtype)
    if dtype is None:
        loss_fn = FusedLinearDPOLoss(
            beta=0.1, reference_free=True, backend="native", memory_budget_mib=budget
        )
        loss_fn(x[0], x[1], labels, bias=x[2]).loss.backward()
    else:
        seq = _exact_sequence_logps(x, labels)
        pairs = seq.shape[0] // 2
        (-torch.nn.functional.logsigmoid(0.1 * (seq[:pairs] - seq[pairs:]))).mean().backward()
    return [z.grad for z in x]


def errors(got, exact):
    """(RMS, max) absolute error of ``got``, and each over that of ``exact`` rounded to bfloat16."""
    rounded = exact.to(torch.bfloat16).double() - exact
    err = got.double() - exact
    rms, worst = err.square().mean().sqrt().item(), err.abs().max().item()
    return rms, worst, rms / rounded.square().mean().sqrt().item(), worst / rounded.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", nargs=4, type=int, default=[4, 512, 1024, 8192], metavar=("N", "T", "H", "V")
    )
    args = parser.parse_args()
    n, t, h, v = args.shape
    hidden, weight, bias, labels = make_linear(n, t, h, v, torch.bfloat16, weight_scale=h**-0.5 * 4)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(3))
    exact = gradients(hidden, weight, bias, labels, weights)
    print(f"shape N={n} T={t} H={h} V={v}, bfloat16 inputs; errors against float64")
    print("path              grad    RMS err   max err   RMS / bf16 rounding   max / bf16 rounding")
    for path in ("auto", "float32"):
        os.environ[native_linear.OPERANDS_ENV] = path
        operands = native_linear.operand_dtype(torch.bfloat16, h)
        _report(str(operands), gradients(hidden, weight, bias, labels, weights, dtype=None), exact)
    os.environ[native_linear.OPERANDS_ENV] = "auto"
    exact = dpo_gradients(hidden, weight, bias, labels)
    print("DPO loss, FusedLinearDPOLoss (default operands)")
    for name, budget in (("keep all rows", 1e6), ("default budget", None), ("budget 0", 0.0)):
        _report(name, dpo_gradients(hidden, weight, bias, labels, budget, dtype=None), exact)


def _report(path: str, got, exact) -> None:
    for name, g, e in zip(("hidden", "weight", "bias"), got, exact):
        rms, worst, rms_x, worst_x = errors(g, e)
        print(f"{path:17} {name:7} {rms:9.2e} {worst:9.2e}   {rms_x:19.2f}   {worst_x:19.2f}")


if __name__ == "__main__":
    main()
