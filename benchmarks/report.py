"""One command that shows where fastdpo stands: a side-by-side sweep with tables and charts.

    python -m benchmarks.report --quick      # a few minutes on 2 CPU cores
    python -m benchmarks.report              # the full sweep (vocabulary 32k/128k/256k, longer sequences)

Every point (method x shape x dtype) runs in a fresh subprocess (``benchmarks.probe``): a
warm-up call, one call whose peak extra resident memory is measured, ``--rounds`` timed
calls (the median is reported) and the largest per-sequence error against float64. All points
of one invocation are taken side by side, and every ratio in the outputs is computed from
rows of that same invocation. Outputs, in ``--out`` (default ``benchmarks/results``):
``report.json`` (raw rows plus machine, library versions and timestamp), ``report.csv``,
``report.md`` (the table the README embeds) and PNG charts of time and memory against
vocabulary size and sequence length, one line per method.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import sys

from benchmarks.probe import probe_in_subprocess

BASELINE = "reference"
PAIRS = 2


def sweep(quick: bool) -> dict:
    """Which vocabularies and sequence lengths to run; the crossing point is in both lines."""
    if quick:
        return {"vocabs": [32000, 128256], "seq_lens": [256, 512], "fixed_seq": 512, "fixed_vocab": 32000,
                "dtypes": ["float32", "bfloat16"], "rounds": 3}  # fmt: skip
    return {"vocabs": [32000, 128256, 256000], "seq_lens": [256, 512, 1024, 2048], "fixed_seq": 512,
            "fixed_vocab": 128256, "dtypes": ["float32", "bfloat16"], "rounds": 5}  # fmt: skip


def points(plan: dict) -> list[tuple[int, int, int]]:
    shapes = [(PAIRS, plan["fixed_seq"], v) for v in plan["vocabs"]]
    shapes += [(PAIRS, t, plan["fixed_vocab"]) for t in plan["seq_lens"]]
    return list(dict.fromkeys(shapes))


def machine_info() -> dict:
    import torch

    versions = {}
    for package in ("torch", "fastdpo", "trl", "liger-kernel", "transformers", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run(plan: dict, methods: list[str], log=print) -> list[dict]:
    rows = []
    todo = [(s, d, m) for s in points(plan) for d in plan["dtypes"] for m in methods]
    for i, (shape, dtype, method) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {method:28s} pairs={shape[0]} T={shape[1]} V={shape[2]} {dtype:8s}"
        try:
            r = probe_in_subprocess(
                method, shape, dtype, "forward_backward", rounds=plan["rounds"], error=True
            )
        except Exception as exc:  # one failing point must not sink the report: record it
            log(f"{label} FAILED: {str(exc).splitlines()[-1] if str(exc) else exc}")
            rows.append(dict(method=method, pairs=shape[0], seq_len=shape[1], vocab=shape[2], dtype=dtype,
                             error_message=str(exc)[-500:]))  # fmt: skip
            continue
        log(
            f"{label} {r['median_s'] * 1000:9.1f} ms  {r['peak_extra_x_logits']:.2f}x logits  err {r['max_abs_error']:.1e}"
        )
        rows.append(dict(method=method, pairs=shape[0], seq_len=shape[1], vocab=shape[2], dtype=dtype, **r))
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-up over the baseline at the same point, from rows of this run only."""
    base = {
        (r["seq_len"], r["vocab"], r["dtype"]): r.get("median_s") for r in rows if r["method"] == BASELINE
    }
    for r in rows:
        b = base.get((r["seq_len"], r["vocab"], r["dtype"]))
        r["speedup_vs_reference"] = round(b / r["median_s"], 2) if b and r.get("median_s") else None


def markdown(rows: list[dict], info: dict, missing: list[str]) -> str:
    lines = [
        f"Forward+backward of per-sequence log-probs from `[2x{PAIRS}, T, V]` logits, ~30% of labels ignored; "
        f"median of several calls, peak extra memory in a fresh process (multiple of the logits' size), "
        f"largest per-sequence error against float64. Machine: {info['cpu']}, {info['cores']} cores, "
        f"torch {info['versions']['torch']}, {info['timestamp']}.",
        "",
        "| T | V | dtype | method | time (ms) | vs reference | peak extra memory | error vs float64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["vocab"], r["dtype"], r.get("median_s") or 1e9)):
        if "median_s" not in r:
            lines.append(f"| {r['seq_len']} | {r['vocab']} | {r['dtype']} | {r['method']} | failed | | | |")
            continue
        lines.append(
            f"| {r['seq_len']} | {r['vocab']} | {r['dtype']} | {r['method']} | {r['median_s'] * 1000:.3g} | "
            f"{r['speedup_vs_reference']:.2f}x | {r['peak_extra_x_logits']:.2f}x | {r['max_abs_error']:.1e} |"
        )
    if missing:
        lines += ["", "Not measured (not installed here): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def charts(rows: list[dict], plan: dict, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, fixed_key, fixed in (
        ("vocab", "seq_len", plan["fixed_seq"]),
        ("seq_len", "vocab", plan["fixed_vocab"]),
    ):
        fig, axes = plt.subplots(
            2, len(plan["dtypes"]), figsize=(5.5 * len(plan["dtypes"]), 8), squeeze=False
        )
        for col, dtype in enumerate(plan["dtypes"]):
            sel = [r for r in rows if r["dtype"] == dtype and r[fixed_key] == fixed and "median_s" in r]
            for method in dict.fromkeys(r["method"] for r in sel):
                pts = sorted((r[axis], r) for r in sel if r["method"] == method)
                xs = [p[0] for p in pts]
                axes[0][col].plot(xs, [p[1]["median_s"] * 1000 for p in pts], marker="o", label=method)
                axes[1][col].plot(
                    xs, [p[1]["peak_extra_bytes"] / 2**20 for p in pts], marker="o", label=method
                )
            axes[0][col].set(title=f"time, {dtype}, {fixed_key}={fixed}", ylabel="ms (median)", yscale="log")
            axes[1][col].set(title=f"peak extra memory, {dtype}", ylabel="MiB", xlabel=axis)
            for ax in (axes[0][col], axes[1][col]):
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"time_memory_vs_{axis}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sweep, a few minutes on 2 cores")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    parser.add_argument("--methods", nargs="*", help="subset of methods to run (default: all available)")
    parser.add_argument("--vocabs", nargs="*", type=int, help="override the vocabulary sizes of the sweep")
    parser.add_argument("--seq-lens", nargs="*", type=int, help="override the sequence lengths of the sweep")
    parser.add_argument(
        "--dtypes", nargs="*", choices=["float32", "bfloat16", "float16"], help="override the dtypes"
    )
    parser.add_argument("--rounds", type=int, help="timed calls per point (the median is reported)")
    args = parser.parse_args(argv)

    from benchmarks.methods import FORWARD_ONLY, available_methods, missing_methods

    runnable = [m for m in available_methods() if m not in FORWARD_ONLY]  # the report times fwd+bwd
    methods = args.methods or runnable
    unknown = set(methods) - set(runnable)
    if unknown:
        parser.error(f"unknown or unavailable methods {sorted(unknown)}; available: {runnable}")
    missing = missing_methods()
    for m in missing:
        print(f"missing: {m}", file=sys.stderr)
    plan = sweep(args.quick)
    for key, value in (
        ("vocabs", args.vocabs),
        ("seq_lens", args.seq_lens),
        ("dtypes", args.dtypes),
        ("rounds", args.rounds),
    ):
        if value:
            plan[key] = value
    if args.vocabs:
        plan["fixed_vocab"] = args.vocabs[0]
    if args.seq_lens:
        plan["fixed_seq"] = args.seq_lens[0]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(
        f"fastdpo report: {len(points(plan)) * len(plan['dtypes']) * len(methods)} points on {info['cpu']}",
        flush=True,
    )
    rows = run(plan, methods, log=lambda s: print(s, flush=True))

    (out / "report.json").write_text(
        json.dumps({"machine": info, "plan": plan, "missing": missing, "rows": rows}, indent=1)
    )
    fields = sorted({k for r in rows for k in r if k != "times"})
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text(markdown(rows, info, missing))
    written = charts(rows, plan, out)
    print(f"wrote {out}/report.json, report.csv, report.md, " + ", ".join(p.name for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
