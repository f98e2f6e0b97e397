"""The ``native`` backend: the C++ kernels of csrc/ (``fastdpo._C``), registered as
``torch.library`` ops ``fastdpo::logps_forward`` / ``logps_backward`` / ``logps_backward_``, and
the fused linear path's tile ops ``fastdpo::lse_fold_`` / ``softmax_grad_tile_``.

This module adds what the C++ side cannot: fake (meta) implementations so the ops trace under
``torch.compile``, and autograd for the forward op so it can be used (and ``opcheck``-ed) on
its own. The dispatch layer (fastdpo/logps.py) calls the forward and backward kernels directly.
"""

from __future__ import annotations

import torch

from fastdpo.backends import Backend

_registered = False


def _register() -> None:
    """Load the extension and register the Python-side pieces of the ops once."""
    global _registered
    if _registered:
        return
    import fastdpo._C  # noqa: F401  (loading the library registers the ops)

    @torch.library.register_fake("fastdpo::logps_forward")
    def _(logits, labels, ignore_index, shift):
        n, t, _v = logits.shape
        out_t = t - 1 if shift else t
        math = dict(
            dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32, device=logits.device
        )
        return (logits.new_empty(n, out_t, **math), logits.new_empty(n, out_t, **math),
                logits.new_empty(n, **math), logits.new_empty(n, **math))  # fmt: skip

    @torch.library.register_fake("fastdpo::logps_backward")
    def _(logits, labels, lse, grad_rows, ignore_index, shift):
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

    @torch.library.register_fake("fastdpo::logps_backward_")
    def _(logits, labels, lse, grad_rows, ignore_index, shift):
        return None

    @torch.library.register_fake("fastdpo::lse_fold_")
    def _(tile, running_max, running_sum):
        return tuple(torch.empty_like(running_max) for _ in range(4))

    @torch.library.register_fake("fastdpo::softmax_grad_tile_")
    def _(tile, labels_local, lse, grad_rows):
        return None

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, shift = inputs
        ctx.save_for_backward(logits, labels, output[1])
        ctx.ignore_index, ctx.shift = ignore_index, shift

    def backward(ctx, grad_tokens, _grad_lse, grad_sequences, _grad_logit_sums):
        logits, labels, lse = ctx.saved_tensors
        grad_rows = torch.zeros_like(lse) if grad_tokens is None else grad_tokens.to(lse.dtype)
        if grad_sequences is not None:
            grad_rows = grad_rows + grad_sequences.to(lse.dtype).unsqueeze(1)
        grad = torch.ops.fastdpo.logps_backward(
            logits, labels, lse, grad_rows.contiguous(), ctx.ignore_index, ctx.shift
        )
        return grad, None, None, None

    torch.library.register_autograd("fastdpo::logps_forward", backward, setup_context=setup_context)
    _registered = True


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    return torch.ops.fastdpo.logps_forward(logits, labels.contiguous(), ignore_index, shift)


def backward(logits, labels, lse, grad_rows, ignore_index, shift, inplace=False):
    labels, grad_rows = labels.contiguous(), grad_rows.contiguous()
    if inplace:
        torch.ops.fastdpo.logps_backward_(logits, labels, lse, grad_rows, ignore_index, shift)
        return logits
    return torch.ops.fastdpo.logps_backward(logits, labels, lse, grad_rows, ignore_index, shift)


def lse_fold(tile, running_max, running_sum):
    return torch.ops.fastdpo.lse_fold_(tile, running_max, running_sum)


def softmax_grad_tile(tile, labels_local, lse, grad_rows):
    torch.ops.fastdpo.softmax_grad_tile_(tile, labels_local, lse, grad_rows)


def load() -> Backend:
    _register()
    return Backend(
        "native", forward, backward, lse_fold, softmax_grad_tile, supports=lambda device: device.type == "cpu"
    )
