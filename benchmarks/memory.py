"""Peak extra memory of one method call, measured in a fresh process.

``python -m benchmarks.memory METHOD SHAPE DTYPE MODE`` prints a JSON line with the peak
resident memory added by one call, beyond the inputs, in bytes and as a multiple of the
logits' size. The call is made once to warm up (compilation, allocator), then the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``) and the call is measured.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(method: str, shape: str, dtype: str, mode: str) -> dict:
    from benchmarks.methods import available_methods, make_inputs, run_once

    fn = available_methods()[method]
    logits, labels = make_inputs(shape, dtype)
    run_once(fn, logits, labels, mode)  # warm-up: compile, load kernels, size allocator pools
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    run_once(fn, logits, labels, mode)
    extra = (_status_kb("VmHWM") - before) * 1024
    logits_bytes = logits.numel() * logits.element_size()
    return {"peak_extra_bytes": extra, "peak_extra_x_logits": round(extra / logits_bytes, 3)}


def measure_in_subprocess(method: str, shape: str, dtype: str, mode: str) -> dict:
    """Run :func:`measure` in a fresh interpreter so earlier work cannot hide or inflate the peak."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", method, shape, dtype, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:5])))
