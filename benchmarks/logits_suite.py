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
  the sum of the last two;
- a compute floor, timed forward only (with the native backend): ``compute-floor-counted`` the
  native forward over the same counted positions with every row of the logits the first one (a
  stride-0 view: one row, 64-500 KB, stays in L2), so it does all of the forward's arithmetic
  and reads nothing from memory. Its time over ``read-floor-counted`` is the least the forward's
  ratio to one read can be on this CPU with one exp per element.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdpo
from benchmarks.ground_truth import float64_sequence_logps, make_logits
from benchmarks.suite import DTYPES, Inputs, Output, Shape, Suite, run_once
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


def _compute_floor_counted(x: Inputs) -> Output:
    logits = x["logits"]
    one_row = logits[0, 0].contiguous().expand(logits.shape)  # stride 0: every row the same
    logps = fastdpo.sequence_logps(one_row, x["labels"], backend="native")
    return _summed(logps)


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
if "native" in fastdpo.available_backends("cpu"):
    FLOORS["compute-floor-counted"] = _compute_floor_counted


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


# Floors, side by side: ``python -m benchmarks.logits_suite [--size full] [--rounds 9] [--threads 2]``
# times the native kernel's forward and forward + backward against the counted-row floors and
# the compute floor, the five interleaved round by round (so a busy machine slows all alike),
# and prints medians and the ratios: forward / one read, forward + backward / (read +
# read-write), compute floor / one read.
FLOOR_CASES = (
    ("forward", "fastdpo-native"),
    ("forward_backward", "fastdpo-native"),
    ("forward", "read-floor-counted"),
    ("forward", "read-write-floor-counted"),
    ("forward", "compute-floor-counted"),
)


def time_against_floors(shape: Shape, dtype: str, rounds: int, clock=time.perf_counter) -> dict:
    """Median seconds of each of ``FLOOR_CASES`` at ``shape``, ``dtype``, interleaved."""
    inputs = make_inputs(shape, dtype)
    times = {case: [] for case in FLOOR_CASES}
    for round_ in range(rounds + 1):  # round 0 warms up (allocator pools, first-touch)
        for mode, method in FLOOR_CASES:
            start = clock()
            run_once(SUITE, SUITE.methods[method], inputs, mode)
            if round_:
                times[(mode, method)].append(clock() - start)
    return {case: statistics.median(t) for case, t in times.items()}


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="native kernel vs memory floors, side by side")
    parser.add_argument("--size", choices=("quick", "full"), default="full")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--cpu-time", action="store_true", help="thread CPU time instead of wall time (needs --threads 1)"
    )
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures the calling thread only: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    for name, shape in SUITE.shapes[args.size].items():
        for dtype in SUITE.dtypes:
            t = time_against_floors(shape, dtype, args.rounds, clock)
            fwd, fwd_bwd, read, read_write, compute = (t[case] * 1e3 for case in FLOOR_CASES)
            print(
                f"{name} {dtype}: forward {fwd:.1f} ms, forward+backward {fwd_bwd:.1f} ms, "
                f"read {read:.1f} ms, read+write {read_write:.1f} ms, compute {compute:.1f} ms | "
                f"forward/read {fwd / read:.2f}, "
                f"forward+backward/(read + read+write) {fwd_bwd / (read + read_write):.2f}, "
                f"compute/read {compute / read:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    _main()
