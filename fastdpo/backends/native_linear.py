"""The fused linear path's loops in C++ (csrc/fused_linear.cpp): the ``native`` backend runs the
whole tiled forward and weight-gradient sweeps natively, with brgemm tiles that multiply
bfloat16 operands and accumulate and write float32 where the CPU has bfloat16 dot-product
instructions (AVX512-BF16, AMX), and float32 operands otherwise.

``forward_tiles`` and ``weight_grad_tiles`` take the arguments of their namesakes in
fastdpo/backends/linear_tiles.py (fastdpo/linear.py calls whichever the backend asks for); the tile
kernels of the backend are not used. ``plan_tiles`` gives this kernel's tile shape.

Setting the environment variable ``FASTDPO_LINEAR_OPERANDS=float32`` makes bfloat16 inputs take
float32 operands (converted while packed), the path of CPUs without bfloat16 instructions: the
tests use it to cover that path on any machine.
"""

from __future__ import annotations

import os

import torch

from fastdpo.backends.linear_tiles import Rows, TilePlan

OPERANDS_ENV = "FASTDPO_LINEAR_OPERANDS"
# Rows per task and vocabulary entries per block. A task owns its rows (forward) or its block
# (weight gradient) and runs its tiles in a fixed order, so the tile shape - never the thread
# count - decides the arithmetic. 256 rows keep a [256, H] float32 accumulator and the packed
# rows in L2; 512 vocabulary entries make each GEMM long enough to amortise packing.
ROW_TILE = 256
VOCAB_TILE = 512

_registered = False


def _register() -> None:
    """Load the extension and register fake implementations (for torch.compile) once."""
    global _registered
    if _registered:
        return
    import fastdpo._C  # noqa: F401  (loading the library registers the ops)

    @torch.library.register_fake("fastdpo::linear_forward")
    def _(
        hidden,
        weight,
        bias,
        row_n,
        row_t,
        labels,
        hidden_grad,
        row_tile,
        vocab_tile,
        half_operands,
        statistics=False,
    ):
        rows = row_n.shape[0]
        stats = rows if statistics else 0
        f32 = [row_n.new_empty((n,), dtype=torch.float32) for n in (rows, rows, rows, stats, stats)]
        return (*f32, row_n.new_empty((stats,), dtype=torch.bool))

    @torch.library.register_fake("fastdpo::linear_weight_grad")
    def _(hidden, weight, bias, row_n, row_t, labels, lse, grad_rows, need_weight, need_bias, *tiles):
        grad_weight = weight.new_empty(weight.shape if need_weight else (0,))
        grad_bias = weight.new_empty((weight.shape[0] if need_bias and bias is not None else 0,))
        return grad_weight, grad_bias

    _registered = True


def half_operands() -> bool:
    """Whether bfloat16 inputs may keep bfloat16 GEMM operands (``FASTDPO_LINEAR_OPERANDS``)."""
    value = os.environ.get(OPERANDS_ENV, "auto")
    if value not in ("auto", "float32"):
        raise ValueError(f"{OPERANDS_ENV} must be 'auto' or 'float32', got {value!r}")
    return value == "auto"


def operand_dtype(dtype: torch.dtype, hidden_size: int) -> torch.dtype:
    """The dtype the kernel multiplies in for inputs of ``dtype``: bfloat16 for bfloat16 inputs
    with an even hidden size on a CPU with bfloat16 instructions, else float32."""
    _register()
    bf16 = dtype == torch.bfloat16 and hidden_size % 2 == 0 and half_operands()
    return torch.bfloat16 if bf16 and torch.ops.fastdpo.linear_bf16_operands() else torch.float32


def plan_tiles(dtype: torch.dtype, hidden_size: int, row_tile=None, vocab_tile=None) -> TilePlan:
    """This kernel's tile shape; explicit sizes win (the tests use tiny ones)."""
    return TilePlan(row_tile or ROW_TILE, vocab_tile or VOCAB_TILE, operand_dtype(dtype, hidden_size))


def _args(hidden, weight, rows: Rows):
    """Operands as the kernel takes them: contiguous last dimensions and index vectors."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return hidden, weight, rows.n.contiguous(), rows.t.contiguous(), rows.label.contiguous()


def forward_tiles(
    hidden, weight, bias, rows: Rows, kernels, plan: TilePlan, hidden_grad=None, statistics=False
):
    """Per counted row ``(label_logit, lse, logit_sum)``, float32 ``[C]``; with ``hidden_grad``
    (zeros, ``hidden``'s shape and dtype) each counted row of it receives
    ``d log_softmax(x)[label] / d h`` (see fastdpo/backends/linear_tiles.py for the contract).
    With ``statistics=True`` also the row's entropy, ``log sum p^2`` (float32) and whether the
    label is the first maximum (bool), folded from the same float32 tiles (docs/fused_linear.md);
    the first three results are bitwise the same either way."""
    _register()
    hidden, weight, n, t, label = _args(hidden, weight, rows)
    out = torch.ops.fastdpo.linear_forward(
        hidden,
        weight,
        bias,
        n,
        t,
        label,
        hidden_grad,
        plan.row_tile,
        plan.vocab_tile,
        half_operands(),
        statistics,
    )
    return out if statistics else out[:3]


def weight_grad_tiles(
    hidden,
    weight,
    bias,
    rows: Rows,
    lse,
    grad_rows,
    kernels,
    plan: TilePlan,
    need_weight=True,
    need_bias=True,
):
    """Gradients of ``sum(grad_rows * logp_rows)`` w.r.t. the head's weight and bias (``None``
    for what is not needed), in the parameters' dtype."""
    _register()
    hidden, weight, n, t, label = _args(hidden, weight, rows)
    need_bias = need_bias and bias is not None
    grad_weight, grad_bias = torch.ops.fastdpo.linear_weight_grad(
        hidden,
        weight,
        bias,
        n,
        t,
        label,
        lse.contiguous(),
        grad_rows.float().contiguous(),
        need_weight,
        need_bias,
        plan.row_tile,
        plan.vocab_tile,
        half_operands(),
    )
    return (grad_weight if need_weight else None), (grad_bias if need_bias else None)
