"""The ``logits`` suite: per-sequence log-probs from ``[2 * pairs, T, V]`` logits and labels.

Inputs ``{"logits", "labels"}`` (logits: standard normal times 2 in the dtype; ~30% of labels
ignored); every method returns the summed shifted log-probs of each sequence, and
``forward_backward`` takes the gradient of their sum with respect to the logits.

- ``fastdpo-<backend>``: ``fastdpo.sequence_logps`` on each backend this CPU runs;
  ``fastdpo-native-inplace`` the native kernel with ``inplace_backward=True``;
- ``naive``: ``fastdpo.naive.naive_sequence_logps`` (float32 ``log_softmax`` of all the
  logits, gather, mask, sum), the baseline; ``naive-compiled`` its ``torch.compile``;
- ``trl-selective-log-softmax``: TRL's ``selective_log_softmax`` as TRL's trainer calls it;
- memory floors, timed forward only: ``read-floor-amax`` one read pass over all the logits;
  ``read-floor-counted`` one read (a sum) of as many rows as are counted, which is what a
  forward must read; ``read-write-floor-counted`` the least a backward moves: a read of as many
  rows as are counted, copied into a preallocated gradient-sized buffer, and the rest of that
  buffer zeroed (every row of the gradient is written once). A forward + backward's floor is
  the sum of the last two.
"""

from __future__ import annotations

import torch

import fastdpo
from benchmarks.ground_truth import float64_sequence_logps, make_logits
from benchmarks.suite import DTYPES, Inputs, Output, Shape, Suite
from fastdpo.naive import naive_sequence_logps


def make_inputs(shape: Shape, dtype: str, seed: int = 0) -> Inputs:
    pairs, t, v = shape
    logits, labels = make_logits(2 * pairs, t, v, DTYPES[dtype], seed=seed, scale=2.0)
    return {"logits": logits, "labels": labels}


def logits_bytes(shape: Shape, dtype: str) -> int:
    pairs, t, v = shape
    return 2 * pairs * t * v * DTYPES[dtype].itemsize


def _summed(logps: torch.Tensor) -> Output:
    return Output(logps.sum(), logps)


def _fastdpo(backend: str):
    return lambda x: _summed(fastdpo.sequence_logps(x["logits"], x["labels"], backend=backend))


def _native_inplace(x: Inputs) -> Output:
    """The native kernel with the opt-in in-place backward: the gradient overwrites the logits.

    In a model the logits are an intermediate (the LM head's output) and the in-place gradient
    flows on to the head's backward. Here they are a leaf, and autograd would clone a gradient
    that aliases the leaf itself; passing them through a view keeps the benchmark honest.
    """
    logits = x["logits"]
    view = logits.view_as(logits) if logits.requires_grad else logits
    out = fastdpo.fused_logps(view, x["labels"], backend="native", inplace_backward=True)
    return _summed(out.sequence_logps)


def _naive(x: Inputs) -> Output:
    return _summed(naive_sequence_logps(x["logits"], x["labels"]))


_compiled = {}


def _naive_compiled(x: Inputs) -> Output:
    if "fn" not in _compiled:  # compiled on first use: importing the suite stays cheap
        _compiled["fn"] = torch.compile(naive_sequence_logps, dynamic=False)
    return _summed(_compiled["fn"](x["logits"], x["labels"]))


def _trl(x: Inputs) -> Output:
    """TRL's ``selective_log_softmax`` on the shifted slice, masked and summed, as TRL's trainer does."""
    from trl.trainer.utils import selective_log_softmax

    target = x["labels"][:, 1:]
    mask = target != -100
    per_token = selective_log_softmax(x["logits"][:, :-1], target.masked_fill(~mask, 0))
    return _summed((per_token * mask).sum(-1))


def _read_floor(x: Inputs) -> Output:
    return _summed(x["logits"].amax(-1).sum(-1))


def _counted_rows(x: Inputs) -> tuple[torch.Tensor, int]:
    """The logits as ``[rows, V]`` and how many of the rows the shifted labels count."""
    logits = x["logits"]
    return logits.view(-1, logits.shape[-1]), int((x["labels"][:, 1:] != -100).sum())


def _read_floor_counted(x: Inputs) -> Output:
    rows, counted = _counted_rows(x)
    total = rows[:counted].sum()
    return Output(total, total.expand(x["logits"].shape[0]))


_gradient_buffers: dict = {}  # one gradient-sized buffer per logits shape, as a backward writes


def _read_write_floor_counted(x: Inputs) -> Output:
    rows, counted = _counted_rows(x)
    key = (rows.shape, rows.dtype)
    if key not in _gradient_buffers:
        _gradient_buffers.clear()  # only the current shape's: full-size buffers are GBs
        _gradient_buffers[key] = torch.empty_like(rows)
    out = _gradient_buffers[key]
    out[:counted].copy_(rows[:counted])
    out[counted:].zero_()
    total = out[:1, :1].sum()
    return Output(total, total.expand(x["logits"].shape[0]))


def _methods() -> dict:
    backends = fastdpo.available_backends("cpu")
    methods = {f"fastdpo-{backend}": _fastdpo(backend) for backend in backends}
    if "native" in backends:
        methods["fastdpo-native-inplace"] = _native_inplace
    return {
        **methods,
        "naive": _naive,
        "naive-compiled": _naive_compiled,
        **FLOORS,
    }


FLOORS = {
    "read-floor-amax": _read_floor,
    "read-floor-counted": _read_floor_counted,
    "read-write-floor-counted": _read_write_floor_counted,
}


SUITE = Suite(
    name="logits",
    description="Per-sequence log-probs from `[2x{pairs}, T, V]` logits, forward+backward",
    dims=("pairs", "seq_len", "vocab"),
    make_inputs=make_inputs,
    grad_inputs=("logits",),
    ground_truth=lambda x: float64_sequence_logps(x["logits"], x["labels"]),
    logits_bytes=logits_bytes,
    baseline="naive",
    methods=_methods(),
    peers={"trl-selective-log-softmax": ("trl", _trl)},
    # (pairs, T, V): full are the shapes (Llama 2 and Llama 3 vocabularies).
    shapes={
        "quick": {"v32k": (2, 128, 32000)},
        "full": {"llama2-32k": (4, 512, 32000), "llama3-128k": (2, 512, 128256)},
    },
    sweeps={
        "quick": dict(
            vocabs=[32000, 128256],
            seq_lens=[128, 256],
            fixed_seq=256,
            fixed_vocab=32000,
            rounds=3,
        ),
        "full": dict(
            vocabs=[32000, 128256, 256000],
            seq_lens=[256, 512, 1024, 2048],
            fixed_seq=512,
            fixed_vocab=128256,
            rounds=5,
        ),
    },
    modes=("forward", "forward_backward"),
    forward_only=frozenset(FLOORS),
)
