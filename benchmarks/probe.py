"""Measure one method of one suite at one point in a fresh process: time, peak extra memory, error.

    python -m benchmarks.probe [--suite logits] METHOD PAIRS SEQ_LEN VOCAB DTYPE MODE [--rounds K] [--error [--truth FILE]]
    python -m benchmarks.probe --suite linear METHOD PAIRS SEQ_LEN HIDDEN VOCAB DTYPE MODE [...]

(the shape's numbers are the suite's ``dims``) prints one JSON line: ``peak_extra_bytes``
(resident memory added by one call beyond the inputs), ``peak_extra_x_logits`` (that, as a
multiple of the size of the logits, or of what they would take for a suite that never builds
them), the ``times`` of ``K`` further calls and their ``median_s``, and with ``--error`` the
largest per-sequence error of the forward against float64 (on the inputs as made, before
any other call). The float64 pass can cost more than the method at large shapes, so a caller that
probes several methods at one point names a ``--truth`` file: loaded if it exists, else written. A suite with ``returned_grad_bytes``
(``linear``) also gets the peak without the gradients the call returns (``working_extra_bytes``,
``working_extra_x_logits``). A warm-up call (compilation, kernel loading, allocator pools) comes
first; then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and one call is
measured. The timed calls then run under glibc's usual steady-state heap policy (see
:func:`_steady_state_malloc`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.suite import DTYPES, MODES, Inputs, Suite, max_abs_error, run_once
from benchmarks.suites import SUITES, get_suite


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _steady_state_malloc() -> None:
    """Give glibc back the heap policy a long training loop runs under, for the timed calls.

    The subprocess starts with every buffer above 64 KB mmapped and returned on free (see
    :func:`probe_in_subprocess`), which measures memory honestly but makes each small
    allocation fault fresh pages: that would charge chunked methods for page faults a
    real loop does not pay. These are the values glibc's own adaptive threshold settles at.
    """
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


def ground_truth(suite: Suite, inputs: Inputs, truth_file: str | None) -> torch.Tensor:
    """The suite's float64 ground truth for ``inputs``, through the cache file if one is named."""
    if truth_file and os.path.exists(truth_file):
        return torch.load(truth_file, weights_only=True)  # a tensor: no code runs on load
    exact = suite.ground_truth(inputs)
    if truth_file:
        torch.save(exact, truth_file + ".part")
        os.replace(truth_file + ".part", truth_file)  # whole or absent, never half-written
    return exact


def probe(
    suite_name: str,
    method: str,
    shape,
    dtype: str,
    mode: str,
    rounds: int = 0,
    error: bool = False,
    truth_file: str | None = None,
):
    suite = get_suite(suite_name)
    fn = suite.method(method)
    inputs = suite.make_inputs(shape, dtype)
    result = {}
    # Before any call: an in-place method may leave its gradient in the inputs.
    if error and method not in suite.forward_only:  # those compute something else
        result["max_abs_error"] = max_abs_error(fn, inputs, ground_truth(suite, inputs, truth_file))
    call = lambda: run_once(suite, fn, inputs, mode)  # noqa: E731
    call()  # warm-up
    gc.collect()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    call()
    extra = (status_kb("VmHWM") - before) * 1024
    logits_bytes = suite.logits_bytes(shape, dtype)
    if suite.returned_grad_bytes is not None:
        working = extra - (suite.returned_grad_bytes(inputs) if mode == "forward_backward" else 0)
        result.update(working_extra_bytes=working, working_extra_x_logits=round(working / logits_bytes, 4))
    result.update(peak_extra_bytes=extra, peak_extra_x_logits=round(extra / logits_bytes, 4))
    if rounds:
        _steady_state_malloc()
        call()  # settle the heap under the new policy before timing
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        result.update(times=times, median_s=statistics.median(times))
    return result


def probe_in_subprocess(
    suite: str,
    method: str,
    shape,
    dtype: str,
    mode: str,
    rounds: int = 0,
    error: bool = False,
    truth_file: str | None = None,
    timeout: float | None = None,
) -> dict:
    """Run :func:`probe` in a fresh interpreter so earlier work cannot hide or inflate the peak."""
    args = [
        sys.executable,
        "-m",
        "benchmarks.probe",
        "--suite",
        suite,
        method,
        *map(str, shape),
        dtype,
        mode,
        "--rounds",
        str(rounds),
    ]
    # A fixed mmap threshold makes glibc return every freed buffer above 64 KB to the system,
    # so the peak resident size counts what one call holds at once, not what the warm-up left
    # cached in the heap (glibc otherwise raises its threshold after the first large free).
    # MALLOC_MMAP_MAX_ back at glibc's default, in case the caller disabled mmap (a setting that
    # keeps big buffers resident, see the README) and so would hide the peak.
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_MAX_="65536"
    )
    out = subprocess.run(
        args + (["--error"] if error else []) + (["--truth", truth_file] if truth_file else []),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe {suite} {method} {shape} {dtype} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=list(SUITES), default="logits")
    parser.add_argument("method")
    dims = "; ".join(f"{name}: {' '.join(d.upper() for d in s.dims)}" for name, s in SUITES.items())
    parser.add_argument("shape", nargs="+", type=int, help=f"the suite's dims ({dims})")
    parser.add_argument("dtype", choices=list(DTYPES))
    parser.add_argument("mode", choices=list(MODES))
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--error", action="store_true")
    parser.add_argument(
        "--truth", help="float64 ground-truth cache for --error: read if present, else written"
    )
    args = parser.parse_args()
    suite = SUITES[args.suite]
    if len(args.shape) != len(suite.dims):
        parser.error(f"the {args.suite} suite takes {len(suite.dims)} shape numbers ({' '.join(suite.dims)})")
    if args.method not in suite.available():
        parser.error(
            f"unknown or unavailable {args.suite} method {args.method!r}; available: {list(suite.available())}"
        )
    result = probe(
        args.suite, args.method, tuple(args.shape), args.dtype, args.mode, args.rounds, args.error, args.truth
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
