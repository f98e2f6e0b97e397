"""Kernel backends, the registry, and the choice of a backend for a device (``resolve_backend``).

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

``forward_statistics(logits, labels, ignore_index, shift) -> (*forward, entropy, log_sum_sq_probs, is_top1, mean_logits)``
    The same pass as ``forward`` (same first four outputs, bitwise), also producing per
    position ``[N, T']``: float32 ``entropy`` ``-sum p log p``, float32 ``log_sum_sq_probs``
    ``log sum p^2``, bool ``is_top1`` (the label is the first maximum of the row, as
    ``argmax`` counts it) and float32 ``mean_logits`` (mean of the row's logits), all of the
    softmax of the float32 row; 0 / False where ignored. No gradient flows through them.

``backward(logits, labels, lse, grad_rows, ignore_index, shift, inplace) -> grad_logits``
    ``grad_rows [N, T']`` float32 is the upstream gradient of each position's log-prob.
    Returns ``grad_rows * (onehot(label) - softmax(logits))`` for counted rows and 0 elsewhere
    (including logits rows the shift leaves unused), in ``logits.dtype``. With ``inplace=True``
    the backend may write the gradient into ``logits``' own storage and return that tensor.

Three tile kernels serve the fused linear path, whose tiled loops (``linear_tiles.py``, kernel
level but not a backend: it runs on any backend's tile kernels) project hidden states onto the
LM head one float32 tile ``[rows, vocabulary block]`` at a time:

``lse_fold(tile, running_max, running_sum) -> (new_max, new_sum, rescale, tile_logit_sum)``
    Folds the tile into each row's online log-sum-exp (all ``[rows]`` float32):
    ``new_max = max(running_max, max(tile))``, ``rescale = exp(running_max - new_max)`` (0 while
    ``running_max`` is ``-inf``), ``new_sum = running_sum * rescale + sum(exp(tile - new_max))``,
    and the sum of the tile's logits. Overwrites ``tile`` with ``exp(tile - new_max)``. A row
    that is all ``-inf`` so far (a masked vocabulary) keeps ``new_max = -inf``, ``new_sum = 0``
    and its tile row becomes zeros: the fold subtracts 0 there, never ``-inf - -inf``.

``stats_fold(tile, running_max, running_sum, running_weighted, running_sq) -> (*lse_fold, new_weighted, new_sq, tile_top)``
    ``lse_fold`` (the same first four outputs and the same ``tile``, bitwise) for
    ``fused_linear_logps(statistics=True)``, also keeping each row's running sums of the token
    statistics relative to its running max ``m``: ``weighted = sum e (x - m)`` and
    ``sq = sum e^2`` with ``e = exp(x - m)``. With ``offset`` the new max (0 while it is
    ``-inf``): ``new_weighted = rescale * (running_weighted + (running_max - offset) *
    running_sum) + sum(e (tile - offset))`` and ``new_sq = rescale^2 * running_sq + sum(e^2)``;
    masked entries (``e = 0``) and an empty running sum add 0, never ``0 * -inf``. ``tile_top``
    (int64 ``[rows]``) is the column of the tile's first maximum (as ``argmax``). Optional
    (``Backend.stats_fold`` may be None: the backend then has no fused linear statistics).

``softmax_grad_tile(tile, labels_local, lse, grad_rows) -> None``
    Overwrites ``tile`` with ``grad_rows * (onehot(labels_local) - exp(tile - lse))``; a label
    outside ``[0, tile.shape[1])`` belongs to another vocabulary block.

What the backends share (the label shift, the fake kernels' shape rule, the one backward of
the log-prob op, the Triton launch heuristic) is in the leaf module ``common.py``. A backend
imports from it and from its own files only (triton_kernels.py takes its tile kernels from
triton_tiles.py), never from another backend.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from fastdpo.backends.common import Backend

__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "known_backends",
    "resolve_backend",
    "why_unavailable",
]

_MODULES = {
    "torch": "fastdpo.backends.torch_chunked",
    "native": "fastdpo.backends.native",
    "triton": "fastdpo.backends.triton_kernels",
}
_loaded: dict[str, Backend | None] = {}
_why_unavailable: dict[str, str] = {}
_warned: set[str] = set()  # kernels whose absence ``auto`` has already warned about


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


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run tensors on ``device`` on this machine."""
    device = torch.device(device)
    names = []
    for name in known_backends():
        backend = get_backend(name)
        if backend is not None and backend.supports(device):
            names.append(name)
    return names


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Pick the backend for ``device``: ``auto`` prefers triton (CUDA), then native (CPU), then torch."""
    if name == "auto":
        kernel = "triton" if device.type == "cuda" else "native"
        backend = get_backend(kernel)
        if backend is not None and backend.supports(device):
            return backend
        _warn_fallback_once(kernel, device)
        return get_backend("torch")
    if name not in known_backends():
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + known_backends()}")
    backend = get_backend(name)
    if backend is None or not backend.supports(device):
        reason = why_unavailable(name) or f"it does not run on {device.type} tensors"
        raise ValueError(
            f"backend {name!r} is not available here ({reason}); available for {device.type}: "
            f"{available_backends(device)} (backend='auto' falls back to 'torch')"
        )
    return backend


def _warn_fallback_once(kernel: str, device: torch.device) -> None:
    if kernel in _warned:
        return
    _warned.add(kernel)
    reason = why_unavailable(kernel) or f"it does not run on {device.type} tensors"
    warnings.warn(
        f"fastdpo: the {kernel} backend is unavailable ({reason}); using the slower torch backend",
        stacklevel=3,
    )
