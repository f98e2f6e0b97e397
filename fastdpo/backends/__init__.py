"""Kernel backends and the registry that dispatch picks from.

Every backend provides the same two kernels (plain functions, no autograd):

``forward(logits, labels, ignore_index, shift) -> (token_logps, lse, sequence_logps, logit_sums)``
    ``logits`` ``[N, T, V]`` (float32/bfloat16/float16, last dim contiguous, any other strides),
    ``labels`` ``[N, T]`` int64, already validated (every label is ``ignore_index`` or in ``[0, V)``).
    Position ``t`` of the output scores ``labels[:, t + 1]`` with ``logits[:, t]`` when ``shift``,
    else ``labels[:, t]``; ``T' = T - 1`` or ``T``. Returns float32 tensors
    ``token_logps [N, T']`` (0 where ignored), ``lse [N, T']`` (log-sum-exp of the row, kept for
    backward; any value where ignored), ``sequence_logps [N]`` (sum of ``token_logps``) and
    ``logit_sums [N]`` (sum over counted positions of the sum of the row's logits, for the
    ``logits/chosen`` metric). Rows whose label is ignored are never read.

``backward(logits, labels, lse, grad_rows, ignore_index, shift, inplace) -> grad_logits``
    ``grad_rows [N, T']`` float32 is the upstream gradient of each position's log-prob.
    Returns ``grad_rows * (onehot(label) - softmax(logits))`` for counted rows and 0 elsewhere
    (including logits rows the shift leaves unused), in ``logits.dtype``. With ``inplace=True``
    the backend may write the gradient into ``logits``' own storage and return that tensor.

Two tile kernels serve the fused linear path (fastdpo/linear_tiles.py), which projects hidden
states onto the LM head one float32 tile ``[rows, vocabulary block]`` at a time:

``lse_fold(tile, running_max, running_sum) -> (new_max, new_sum, rescale, tile_logit_sum)``
    Folds the tile into each row's online log-sum-exp (all ``[rows]`` float32):
    ``new_max = max(running_max, max(tile))``, ``rescale = exp(running_max - new_max)`` (0 while
    ``running_max`` is ``-inf``), ``new_sum = running_sum * rescale + sum(exp(tile - new_max))``,
    and the sum of the tile's logits. Overwrites ``tile`` with ``exp(tile - new_max)``.

``softmax_grad_tile(tile, labels_local, lse, grad_rows) -> None``
    Overwrites ``tile`` with ``grad_rows * (onehot(labels_local) - exp(tile - lse))``; a label
    outside ``[0, tile.shape[1])`` belongs to another vocabulary block.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    lse_fold: Callable
    softmax_grad_tile: Callable
    supports: Callable[[torch.device], bool]  # can this backend run tensors on that device?


_MODULES = {
    "torch": "fastdpo.backends.torch_chunked",
    "native": "fastdpo.backends.native",
    "triton": "fastdpo.backends.triton_kernels",
}
_loaded: dict[str, Backend | None] = {}
_why_unavailable: dict[str, str] = {}


def _load(name: str) -> Backend | None:
    """Import a backend module once; remember why it could not load."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            backend = module.load()
        except Exception as exc:  # missing extension, missing triton, ...: not fatal
            backend = None
            _why_unavailable[name] = f"{type(exc).__name__}: {exc}"
        _loaded[name] = backend
    return _loaded[name]


def known_backends() -> tuple[str, ...]:
    return tuple(_MODULES)


def get_backend(name: str) -> Backend | None:
    return _load(name)


def why_unavailable(name: str) -> str:
    _load(name)
    return _why_unavailable.get(name, "")
