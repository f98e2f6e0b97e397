"""The native fused linear kernel (issue 15) side by side with the previous tiled loops, Liger and
TRL: time, peak memory and per-sequence error of a DPO step from hidden states, each method in
fresh processes, the processes of all methods interleaved so that a busy machine slows them alike.

    python -m benchmarks.linear_native [--shape 2,512,1024,32000] [--dtypes float32,bfloat16]
        [--methods a,b] [--rounds 3] [--repeats 2] [--resident] [--threads N]

Inputs, the DPO loss (sigmoid, beta 0.1, policy + reference through one head, both hidden
states and head needing gradients for the policy) and the float64 ground truth are those of
benchmarks/linear_methods.py. Methods:

- ``fastdpo-native``: ``FusedLinearDPOLoss`` on the native kernel (bfloat16 GEMM operands where
  the CPU has bf16 instructions) with its default memory budget (no recompute when the chunk of
  pairs fits); ``fastdpo-native-recompute`` the same with ``memory_budget_mib=0`` (4 GEMMs, no
  logits kept); ``fastdpo-native-f32-operands`` the default forced to float32 operands
  (``FASTDPO_LINEAR_OPERANDS=float32``, the path of CPUs without bf16 instructions).
- ``fastdpo-tiles``: the previous fused linear loops (fastdpo/linear_tiles.py: torch matmuls in
  float32 per tile, the ``torch`` backend's tile kernels).
- ``liger-eager``: Liger's ``LigerFusedLinearDPOLoss(compiled=False)``, one pair per chunk.
- ``trl-chunked-logprob``: TRL's ``ChunkedLogProbFunction`` as its DPOTrainer calls it on CPU.

Per method: median seconds of all timed calls (fwd+bwd), the least CPU time of one call (all
threads; with ``--threads 1`` a measure a busy machine disturbs less), the peak resident memory one call adds
(``peak``) and that minus the gradients it returns (``working``), measured with glibc returning
freed buffers (a 64 KB mmap threshold, as benchmarks/probe.py does), and the largest
per-sequence log-prob error against float64. ``--resident`` times with memory kept resident
(``MALLOC_MMAP_MAX_=0``, no trimming) instead of glibc's steady-state policy.
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

from benchmarks import linear_methods as lm
from benchmarks.probe import _steady_state_malloc, status_kb

DEFAULT_METHODS = (
    "fastdpo-native",
    "fastdpo-native-recompute",
    "fastdpo-native-f32-operands",
    "fastdpo-tiles",
    "liger-eager",
    "trl-chunked-logprob",
)


def _liger_eager(x):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    w = x["weight"]
    loss_fn = LigerFusedLinearDPOLoss(beta=lm.BETA, compiled=False)
    loss, aux = loss_fn(w, x["hidden"][:, :-1], x["labels"][:, 1:], None, x["ref_hidden"][:, :-1], w.detach())
    return loss, torch.cat([aux[0], aux[1]])


def _fastdpo_native(budget_mib=None):
    import fastdpo

    options = {} if budget_mib is None else {"memory_budget_mib": budget_mib}
    loss_fn = fastdpo.FusedLinearDPOLoss(beta=lm.BETA, backend="native", **options)

    def run(x):
        out = loss_fn(x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"])
        return out.loss, torch.cat([out.policy_chosen_logps, out.policy_rejected_logps])

    return run


def method(name: str):
    """``fn(inputs) -> (loss, policy_logps)``; the forced-operand variant sets its variable here,
    in the probe process (the kernel reads it on every call)."""
    if name == "fastdpo-native-f32-operands":
        os.environ["FASTDPO_LINEAR_OPERANDS"] = "float32"
        return _fastdpo_native()
    table = {
        "fastdpo-native": _fastdpo_native,
        "fastdpo-native-recompute": lambda: _fastdpo_native(0.0),
        "fastdpo-tiles": lambda: lm._fastdpo("torch"),
        "liger-eager": lambda: _liger_eager,
        "trl-chunked-logprob": lambda: lm._trl,
    }
    if name not in table:
        raise ValueError(f"unknown method {name!r}; choose from {DEFAULT_METHODS}")
    return table[name]()


def probe(name: str, shape: tuple, dtype: str, rounds: int, error: bool) -> dict:
    """One method in this (fresh) process: peak memory of one call, then ``rounds`` timed calls."""
    if os.environ.get("FASTDPO_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTDPO_BENCH_THREADS"]))
    fn, x = method(name), lm.make_inputs(shape, dtype)
    call = lambda: lm.run_once(fn, x, "forward_backward")  # noqa: E731
    call()  # warm-up: kernel caches, allocator pools
    gc.collect()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    call()
    peak = (status_kb("VmHWM") - before) * 1024
    result = {
        "peak_bytes": peak,
        "working_bytes": peak - lm.gradient_bytes(x),
        "logits_bytes": lm.logits_bytes(x),
    }
    if os.environ.get("FASTDPO_BENCH_RESIDENT") != "1":
        _steady_state_malloc()
    call()
    times, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result.update(times=times, cpu_times=cpu)
    if error:
        result["max_abs_error"] = lm.max_abs_error(fn, x, lm.float64_policy_logps(x))
    return result


def probe_in_subprocess(name, shape, dtype, rounds, error, resident=False, threads=None) -> dict:
    # Memory: glibc returns every freed buffer above 64 KB (benchmarks/probe.py explains why).
    # With --resident the whole run keeps memory resident instead (the README's second setting).
    if resident:
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="18446744073709551615",
                   FASTDPO_BENCH_RESIDENT="1")  # fmt: skip
    else:
        env = dict(
            os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_MAX_="65536"
        )
    if threads:
        env["FASTDPO_BENCH_THREADS"] = str(threads)
    args = [sys.executable, "-m", "benchmarks.linear_native", "--probe", name, "--shape", ",".join(map(str, shape)),
            "--dtypes", dtype, "--rounds", str(rounds)] + (["--error"] if error else [])  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} {shape} {dtype} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(shape, dtype, names, rounds, repeats, resident=False, threads=None) -> list[dict]:
    """Every method ``repeats`` times in fresh processes, interleaved; one row per method."""
    runs = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            runs[name].append(probe_in_subprocess(name, shape, dtype, rounds, repeat == 0, resident, threads))
    rows = []
    for name, results in runs.items():
        rows.append(dict(
            method=name, median_s=statistics.median(t for r in results for t in r["times"]),
            min_cpu_s=min(t for r in results for t in r["cpu_times"]),
            peak_bytes=min(r["peak_bytes"] for r in results), working_bytes=min(r["working_bytes"] for r in results),
            logits_bytes=results[0]["logits_bytes"], max_abs_error=results[0]["max_abs_error"],
        ))  # fmt: skip
        if resident:  # freed memory stays in the heap: one call's peak is not measurable
            rows[-1].update(peak_bytes=None, working_bytes=None)
    return rows


def table(rows: list[dict], base: str = "fastdpo-native", peer: str = "liger-eager") -> str:
    by = {r["method"]: r for r in rows}
    mib = 2**20
    lines = ["| method | median s | x native | x Liger time | min CPU s | peak MiB | working MiB | x Liger peak | max seq err |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def ratio(r, key, other):
        return f"{r[key] / by[other][key]:.2f}" if other in by and by[other][key] else "-"

    for r in rows:
        memory = (
            f"{r['peak_bytes'] / mib:.0f} | {r['working_bytes'] / mib:.0f} | {ratio(r, 'peak_bytes', peer)}"
        )
        lines.append(
            f"| {r['method']} | {r['median_s']:.3f} | {ratio(r, 'median_s', base)} | {ratio(r, 'median_s', peer)} | "
            f"{r['min_cpu_s']:.3f} | "
            f"{memory if r['peak_bytes'] is not None else '- | - | -'} | {r['max_abs_error']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="2,512,1024,32000", help="PAIRS,T,H,V")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per method")
    parser.add_argument("--resident", action="store_true", help="time with memory kept resident")
    parser.add_argument("--threads", type=int, help="torch threads in every probe (default: torch's)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--error", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.probe:
        print(json.dumps(probe(args.probe, shape, args.dtypes, args.rounds, args.error)))
        return
    print(f"load average before: {os.getloadavg()}", flush=True)
    for dtype in args.dtypes.split(","):
        rows = compare(
            shape, dtype, args.methods.split(","), args.rounds, args.repeats, args.resident, args.threads
        )
        print(
            f"\n{shape} {dtype}{' (memory kept resident)' if args.resident else ''}\n{table(rows)}",
            flush=True,
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
