"""Measure one method at one point in a fresh process: time, peak extra memory, error.

    python -m benchmarks.probe METHOD PAIRS SEQ_LEN VOCAB DTYPE MODE [--rounds K] [--error]
    python -m benchmarks.probe --suite linear METHOD PAIRS SEQ_LEN HIDDEN VOCAB DTYPE MODE [...]

prints one JSON line: ``peak_extra_bytes`` (resident memory added by one call beyond the
inputs), ``peak_extra_x_logits`` (that, as a multiple of the logits' size, or of what they
would take for the ``linear`` suite, which has no logits), the ``times`` of ``K`` further calls
and their ``median_s``, and with ``--error`` the largest per-sequence error of the forward
against float64. The ``linear`` suite also reports the peak without the gradients the call
returns (``working_extra_bytes``, ``working_extra_x_logits``). A warm-up call (compilation,
kernel loading, allocator pools) comes first; then the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) and one call is measured. The timed calls then run under glibc's
usual steady-state heap policy (see :func:`_steady_state_malloc`).
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


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _suite(name: str):
    """The methods module of a suite: ``logits`` (benchmarks.methods) or ``linear``."""
    import importlib

    return importlib.import_module(
        {"logits": "benchmarks.methods", "linear": "benchmarks.linear_methods"}[name]
    )


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


def probe(method, shape, dtype: str, mode: str, rounds: int = 0, error: bool = False, suite: str = "logits"):
    m = _suite(suite)
    fn = m.available_methods()[method]
    inputs = m.make_inputs(shape, dtype)
    args = inputs if suite == "linear" else tuple(inputs)  # logits suite: (logits, labels)
    call = (
        (lambda: m.run_once(fn, args, mode)) if suite == "linear" else (lambda: m.run_once(fn, *args, mode))
    )
    call()  # warm-up
    gc.collect()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    call()
    extra = (status_kb("VmHWM") - before) * 1024
    if suite == "linear":
        logits_bytes = m.logits_bytes(inputs)
        working = extra - (m.gradient_bytes(inputs) if mode == "forward_backward" else 0)
        result = {"working_extra_bytes": working, "working_extra_x_logits": round(working / logits_bytes, 4)}
    else:
        logits_bytes = inputs[0].numel() * inputs[0].element_size()
        result = {}
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
    if error:
        if suite == "linear":
            result["max_abs_error"] = m.max_abs_error(fn, inputs, m.float64_policy_logps(inputs))
        else:
            exact = m.float64_sequence_logps(*inputs)
            result["max_abs_error"] = m.max_abs_error(fn, *inputs, exact)
    return result


def probe_in_subprocess(
    method, shape, dtype, mode, rounds=0, error=False, timeout=None, suite="logits"
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
        args + (["--error"] if error else []), capture_output=True, text=True, timeout=timeout, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe {method} {shape} {dtype} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=["logits", "linear"], default="logits")
    parser.add_argument("method")
    parser.add_argument(
        "shape", nargs="+", type=int, help="PAIRS SEQ_LEN VOCAB (linear: PAIRS SEQ_LEN HIDDEN VOCAB)"
    )
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("mode", choices=["forward", "forward_backward"])
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--error", action="store_true")
    args = parser.parse_args()
    if len(args.shape) != (4 if args.suite == "linear" else 3):
        parser.error(f"the {args.suite} suite takes {4 if args.suite == 'linear' else 3} shape numbers")
    shape = tuple(args.shape)
    print(json.dumps(probe(args.method, shape, args.dtype, args.mode, args.rounds, args.error, args.suite)))


if __name__ == "__main__":
    main()
