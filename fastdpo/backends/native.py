"""The ``native`` backend: the C++ kernels of csrc/ (``fastdpo._C``), registered as
``torch.library`` ops ``fastdpo::logps_forward`` / ``logps_forward_statistics`` /
``logps_backward`` / ``logps_backward_``, and
the fused linear path's tile ops ``fastdpo::lse_fold_`` / ``softmax_grad_tile_``.

Importing this module loads the extension (which defines the ops: schemas in csrc/ops.cpp) and
adds, once, what the C++ side cannot: fake (meta) implementations, so the ops trace under
``torch.compile``, and autograd for the forward op (the shared backward of
fastdpo/backends/common.py), so it can be used and ``opcheck``-ed on its own.
"""

from __future__ import annotations

import torch

import fastdpo._C  # noqa: F401  (loading the library registers the ops)
from fastdpo.backends.common import (
    Backend,
    fake_logps_backward,
    fake_logps_backward_,
    fake_logps_forward,
    out_len,
    register_logps_autograd,
)

# entropy, log_sum_sq_probs, is_top1, mean_logits (whatever the logits' dtype)
STATISTICS_DTYPES = (torch.float32, torch.float32, torch.bool, torch.float32)


def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    return torch.ops.fastdpo.logps_forward(logits, labels.contiguous(), ignore_index, shift)


def forward_statistics(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    return torch.ops.fastdpo.logps_forward_statistics(logits, labels.contiguous(), ignore_index, shift)


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


def _fake_forward_statistics(logits, labels, ignore_index, shift):
    n, time, _ = logits.shape
    per_position = dict(size=(n, out_len(time, shift)), device=logits.device)
    statistics = [torch.empty(**per_position, dtype=dtype) for dtype in STATISTICS_DTYPES]
    return (*fake_logps_forward(logits, labels, ignore_index, shift), *statistics)


def _fake_lse_fold(tile, running_max, running_sum):
    return tuple(torch.empty_like(running_max) for _ in range(4))


def _fake_softmax_grad_tile(tile, labels_local, lse, grad_rows):
    return None


torch.library.register_fake("fastdpo::logps_forward", fake_logps_forward)
torch.library.register_fake("fastdpo::logps_forward_statistics", _fake_forward_statistics)
torch.library.register_fake("fastdpo::logps_backward", fake_logps_backward)
torch.library.register_fake("fastdpo::logps_backward_", fake_logps_backward_)
torch.library.register_fake("fastdpo::lse_fold_", _fake_lse_fold)
torch.library.register_fake("fastdpo::softmax_grad_tile_", _fake_softmax_grad_tile)
register_logps_autograd("fastdpo::logps_forward", backward)


def load() -> Backend:
    return Backend(
        "native",
        forward,
        backward,
        lse_fold,
        softmax_grad_tile,
        supports=lambda device: device.type == "cpu",
        forward_statistics=forward_statistics,
    )
