"""Measure one method at one point in a fresh process: time, peak extra memory, error.

    python -m benchmarks.probe METHOD PAIRS SEQ_LEN VOCAB DTYPE MODE [--rounds K] [--error]

prints one JSON line: ``peak_extra_bytes`` (resident memory added by one call beyond the
inputs), ``peak_extra_x_logits`` (that, as a multiple of the logits' size), the ``times`` of
``K`` further calls and their ``median_s``, and with ``--error`` the largest per-sequence
error of the forward against float64. A warm-up call (compilation, kernel loading, allocator
pools) comes first; then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and
one call is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(
    method: str, shape: tuple[int, int, int], dtype: str, mode: str, rounds: int = 0, error: bool = False
):
    from benchmarks.methods import (
        available_methods,
        float64_sequence_logps,
        make_inputs,
        max_abs_error,
        run_once,
    )

    fn = available_methods()[method]
    logits, labels = make_inputs(shape, dtype)
    run_once(fn, logits, labels, mode)  # warm-up
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    run_once(fn, logits, labels, mode)
    extra = (_status_kb("VmHWM") - before) * 1024
    result = {
        "peak_extra_bytes": extra,
        "peak_extra_x_logits": round(extra / (logits.numel() * logits.element_size()), 3),
    }
    if rounds:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run_once(fn, logits, labels, mode)
            times.append(time.perf_counter() - start)
        result.update(times=times, median_s=statistics.median(times))
    if error:
        result["max_abs_error"] = max_abs_error(fn, logits, labels, float64_sequence_logps(logits, labels))
    return result


def probe_in_subprocess(method, shape, dtype, mode, rounds=0, error=False, timeout=None) -> dict:
    """Run :func:`probe` in a fresh interpreter so earlier work cannot hide or inflate the peak."""
    args = [
        sys.executable,
        "-m",
        "benchmarks.probe",
        method,
        *map(str, shape),
        dtype,
        mode,
        "--rounds",
        str(rounds),
    ]
    out = subprocess.run(
        args + (["--error"] if error else []), capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe {method} {shape} {dtype} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method")
    parser.add_argument("shape", nargs=3, type=int, metavar=("PAIRS", "SEQ_LEN", "VOCAB"))
    parser.add_argument("dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("mode", choices=["forward", "forward_backward"])
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--error", action="store_true")
    args = parser.parse_args()
    print(json.dumps(probe(args.method, tuple(args.shape), args.dtype, args.mode, args.rounds, args.error)))


if __name__ == "__main__":
    main()
