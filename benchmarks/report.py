"""One command that shows where fastdpo stands: a side-by-side sweep with tables and charts.

    python -m benchmarks.report --quick                    # several minutes on 2 CPU cores
    python -m benchmarks.report --quick --readme README.md  # and refresh the README's tables and charts
    python -m benchmarks.report                            # the full sweep (32k/128k/256k, longer sequences; hours)

Every suite of ``benchmarks/suites.py``, forward+backward of a DPO step's log-probs:

- ``logits``: per-sequence log-probs from ``[2x2, T, V]`` logits: every fastdpo backend against
  the naive implementation, ``torch.compile`` of it and TRL's ``selective_log_softmax``;
- ``linear``: the DPO loss from ``[2x2, T, H]`` hidden states and a ``[V, H]`` LM head, policy
  and reference: fastdpo's fused linear path against the naive and the native-kernel unfused
  paths (matmul, then log-probs from the logits), TRL's chunked log-prob function and Liger's
  fused linear DPO loss.

Each suite's sweep (``Suite.sweeps``) is a line of vocabulary sizes at one sequence length and a
line of sequence lengths at one vocabulary. Every point (suite x method x shape x dtype) runs in
a fresh subprocess (``benchmarks.probe``): a warm-up call, one call whose peak extra resident
memory is measured, ``--rounds`` timed calls (the median is reported) and the largest
per-sequence error against float64. All points of one invocation are taken side by side, and
every ratio in the outputs is computed from rows of that same invocation, against the suite's
baseline. Outputs, in ``--out`` (default ``benchmarks/results``): ``report.json`` (raw rows
plus machine, library versions and timestamp), ``report.csv``, ``report.md`` (a compact table
per suite, which the README embeds, then every point) and PNG charts of time and memory against
vocabulary size and sequence length, one line per method, one pair of charts per suite.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import tempfile

from benchmarks.probe import probe_in_subprocess
from benchmarks.suite import DTYPES
from benchmarks.suites import SUITES

PAIRS = 2
# Column headings of a shape's numbers (``pairs`` is fixed at PAIRS and not shown).
SYMBOLS = {"seq_len": "T", "hidden": "H", "vocab": "V"}


def sweep(quick: bool) -> dict:
    """Per suite: which vocabularies and sequence lengths to run (a copy the caller may edit)."""
    size = "quick" if quick else "full"
    return {name: dict(copy.deepcopy(s.sweeps[size]), dtypes=list(s.dtypes)) for name, s in SUITES.items()}


def points(suite: str, plan: dict) -> list[tuple[int, ...]]:
    """Probe shapes, in the suite's ``dims``: the vocabulary line, then the sequence-length line
    (the crossing point once). Dims other than pairs, seq_len and vocab come from the plan."""
    seq_vocab = [(plan["fixed_seq"], v) for v in plan["vocabs"]]
    seq_vocab += [(t, plan["fixed_vocab"]) for t in plan["seq_lens"]]
    dims = SUITES[suite].dims
    return [
        tuple(dict(plan, pairs=PAIRS, seq_len=t, vocab=v)[d] for d in dims)
        for t, v in dict.fromkeys(seq_vocab)
    ]


def suite_methods(suite: str) -> tuple[list[str], list[str]]:
    """(runnable methods, missing peers) of a suite; the report times forward+backward only."""
    s = SUITES[suite]
    return [m for m in s.available() if m not in s.forward_only], s.missing()


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
    flags = next(
        (line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []
    )
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_features": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _shape_fields(suite: str, shape: tuple[int, ...]) -> dict:
    return dict(suite=suite, **dict(zip(SUITES[suite].dims, shape)))


def _dims_label(suite: str, shape: tuple[int, ...]) -> str:
    return " ".join(f"{SYMBOLS.get(d, d)}={n}" for d, n in zip(SUITES[suite].dims, shape) if d != "pairs")


def run(plans: dict, methods: dict[str, list[str]], log=print) -> list[dict]:
    rows = []
    todo = [
        (suite, shape, dtype, method)
        for suite, plan in plans.items()
        for shape in points(suite, plan)
        for dtype in plan["dtypes"]
        for method in methods[suite]
    ]
    truths = tempfile.TemporaryDirectory()  # one float64 ground truth per point, shared by its methods
    for i, (suite, shape, dtype, method) in enumerate(todo, 1):
        label = f"[{i}/{len(todo)}] {suite:6s} {method:28s} {_dims_label(suite, shape)} {dtype:8s}"
        rounds, truth = (
            plans[suite]["rounds"],
            os.path.join(truths.name, _dims_label(suite, shape) + f" {dtype}.pt"),
        )
        try:
            r = probe_in_subprocess(
                suite, method, shape, dtype, "forward_backward", rounds=rounds, error=True, truth_file=truth
            )
        except Exception as exc:  # one failing point must not sink the report: record it
            log(f"{label} FAILED: {str(exc).splitlines()[-1] if str(exc) else exc}")
            fields = _shape_fields(suite, shape)
            rows.append(dict(method=method, dtype=dtype, **fields, error_message=str(exc)[-500:]))
            continue
        log(
            f"{label} {r['median_s'] * 1000:9.1f} ms  {r['peak_extra_x_logits']:.2f}x logits  "
            f"err {r['max_abs_error']:.1e}"
        )
        rows.append(dict(method=method, dtype=dtype, **_shape_fields(suite, shape), **r))
    truths.cleanup()
    add_ratios(rows)
    return rows


def _shown_dims(suite: str) -> tuple[str, ...]:
    return tuple(d for d in SUITES[suite].dims if d != "pairs")


def _point(r: dict) -> tuple:
    """Where a row was measured: suite, the shown dims (seq_len, [hidden,] vocab), dtype."""
    return (r["suite"], *(r[d] for d in _shown_dims(r["suite"])), r["dtype"])


def add_ratios(rows: list[dict]) -> None:
    """Speed-up over the suite's baseline at the same point, from rows of this run only."""
    base = {_point(r): r.get("median_s") for r in rows if r["method"] == SUITES[r["suite"]].baseline}
    for r in rows:
        b = base.get(_point(r))
        r["speedup_vs_baseline"] = round(b / r["median_s"], 2) if b and r.get("median_s") else None


def _by_suite(rows: list[dict]):
    """(suite, its rows) for each suite that has rows, in the order of SUITES."""
    for suite in SUITES:
        chosen = [r for r in rows if r["suite"] == suite]
        if chosen:
            yield suite, chosen


def _missing_line(missing: list[str]) -> list[str]:
    return ["", "Not measured (not installed here): " + ", ".join(missing) + "."] if missing else []


def _heading(suite: str) -> str:
    return SUITES[suite].description.format(pairs=PAIRS)


def _row(cells) -> str:
    """A markdown table row; an empty cell is ``| |``."""
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def markdown(rows: list[dict], info: dict, missing: list[str]) -> str:
    lines = [
        f"Machine: {info['cpu']} ({', '.join(info['cpu_features'])}), {info['cores']} cores, "
        f"torch {info['versions']['torch']}, {info['timestamp']}. Times are medians of several calls; "
        "peak extra memory is measured in a fresh process, as a multiple of the logits' size (for the linear "
        "suite, of what the logits would take); error is the largest per-sequence log-prob error against float64.",
    ]
    for suite, chosen in _by_suite(rows):
        dims = _shown_dims(suite)
        working = SUITES[suite].returned_grad_bytes is not None
        values = ["time (ms)", "vs baseline", "peak extra memory"]
        values += ["without returned grads"] if working else []
        values += ["error vs float64"]
        columns = [SYMBOLS.get(d, d) for d in dims] + ["dtype", "method"] + values
        lines += [
            "",
            f"**{suite}**: {_heading(suite)}, ~30% of labels ignored. Baseline: `{SUITES[suite].baseline}`.",
            "",
            _row(columns),
            "|" + "---|" * len(columns),
        ]
        for r in sorted(chosen, key=lambda r: (*_point(r)[1:], r.get("median_s") or 1e9)):
            head = [r[d] for d in dims] + [r["dtype"], r["method"]]
            if "median_s" not in r:
                lines.append(_row(head + ["failed"] + [""] * (len(values) - 1)))
                continue
            ratio = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else ""
            cells = [f"{r['median_s'] * 1000:.4g}", ratio, f"{r['peak_extra_x_logits']:.3f}x"]
            cells += [f"{r['working_extra_x_logits']:.3f}x"] if working else []
            lines.append(_row(head + cells + [f"{r['max_abs_error']:.1e}"]))
    return "\n".join(lines + _missing_line(missing)) + "\n"


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if "median_s" not in r:
        return "failed"
    ratio = f"**{r['speedup_vs_baseline']:.2f}x**" if r["speedup_vs_baseline"] else "?"
    return f"{ratio} · {r['peak_extra_x_logits']:.2f}"


def summary(rows: list[dict], info: dict, missing: list[str]) -> str:
    """One compact table per suite: a row per point, a column per method, each cell
    ``speed-up over the baseline · peak extra memory (x logits)``; then each method's worst error."""
    lines = [
        f"Measured on {info['cpu']} ({', '.join(info['cpu_features'])}), {info['cores']} cores, "
        f"torch {info['versions']['torch']}, {info['timestamp'][:10]}. Each cell: **speed-up** of "
        "forward+backward over the suite's baseline (median of several calls, all taken in one run) · "
        "peak extra memory in a fresh process, as a multiple of the logits' size (for `linear`, of what "
        "they would take; including the gradients returned).",
    ]
    for suite, chosen in _by_suite(rows):
        methods = list(dict.fromkeys(r["method"] for r in chosen))
        by_point: dict[tuple, dict] = {}
        for r in chosen:
            by_point.setdefault(_point(r), {})[r["method"]] = r
        dims = _shown_dims(suite)
        lines += ["", f"**{suite}** — {_heading(suite)}. Baseline: `{SUITES[suite].baseline}`.", ""]
        lines.append(_row([SYMBOLS.get(d, d) for d in dims] + ["dtype"] + [f"`{m}`" for m in methods]))
        lines.append("|---" * (len(dims) + 1 + len(methods)) + "|")
        for point in sorted(by_point):
            lines.append(_row([*point[1:], *(_cell(by_point[point].get(m)) for m in methods)]))
        errors = {
            m: [r["max_abs_error"] for r in chosen if r["method"] == m and "max_abs_error" in r]
            for m in methods
        }
        worst = [f"{max(e):.1e}" if e else "" for e in errors.values()]
        lines.append(_row(["worst error vs float64"] + [""] * len(dims) + worst))
    return "\n".join(lines + _missing_line(missing)) + "\n"


README_START, README_END = "<!-- benchmark-report:start -->", "<!-- benchmark-report:end -->"


def update_readme(readme: pathlib.Path, text: str, images: list[pathlib.Path]) -> None:
    """Replace what lies between the README's report markers with the summary and the charts."""
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to update")
    base = readme.resolve().parent
    links = [f"![{p.stem}]({os.path.relpath(p.resolve(), base)})" for p in images]
    block = "\n".join([README_START, text.rstrip(), "", *links, README_END])
    before, rest = content.split(README_START, 1)
    readme.write_text(before + block + rest.split(README_END, 1)[1])


def charts(rows: list[dict], plans: dict, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for suite, plan in plans.items():
        for axis, fixed_key, fixed in (
            ("vocab", "seq_len", plan["fixed_seq"]),
            ("seq_len", "vocab", plan["fixed_vocab"]),
        ):
            fig, axes = plt.subplots(
                2, len(plan["dtypes"]), figsize=(5.5 * len(plan["dtypes"]), 8), squeeze=False
            )
            for col, dtype in enumerate(plan["dtypes"]):
                here = (suite, dtype, fixed)
                sel = [r for r in rows if (r["suite"], r["dtype"], r[fixed_key]) == here and "median_s" in r]
                for method in dict.fromkeys(r["method"] for r in sel):
                    pts = sorted((r[axis], r) for r in sel if r["method"] == method)
                    xs = [p[0] for p in pts]
                    axes[0][col].plot(xs, [p[1]["median_s"] * 1000 for p in pts], marker="o", label=method)
                    axes[1][col].plot(
                        xs, [p[1]["peak_extra_bytes"] / 2**20 for p in pts], marker="o", label=method
                    )
                axes[0][col].set(
                    title=f"{suite}: time, {dtype}, {fixed_key}={fixed}", ylabel="ms (median)", yscale="log"
                )
                axes[1][col].set(title=f"{suite}: peak extra memory, {dtype}", ylabel="MiB", xlabel=axis)
                for ax in (axes[0][col], axes[1][col]):
                    ax.grid(True, alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            path = out / f"{suite}_time_memory_vs_{axis}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sweep, several minutes on 2 cores")
    parser.add_argument("--suites", nargs="*", choices=SUITES, default=list(SUITES), help="default: both")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    parser.add_argument("--methods", nargs="*", help="subset of methods to run (default: all available)")
    parser.add_argument("--vocabs", nargs="*", type=int, help="override the vocabulary sizes of the sweep")
    parser.add_argument("--seq-lens", nargs="*", type=int, help="override the sequence lengths of the sweep")
    parser.add_argument("--hidden", type=int, help="override the hidden size of the linear suite")
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES), help="override the dtypes")
    parser.add_argument("--rounds", type=int, help="timed calls per point (the median is reported)")
    parser.add_argument("--readme", help="also rewrite the benchmark block of this README (e.g. README.md)")
    args = parser.parse_args(argv)

    plans = {suite: plan for suite, plan in sweep(args.quick).items() if suite in args.suites}
    for suite, plan in plans.items():
        for dtype, reason in SUITES[suite].slow_dtypes().items():
            if not args.dtypes and dtype in plan["dtypes"]:
                plan["dtypes"] = [d for d in plan["dtypes"] if d != dtype]
                print(
                    f"note: {suite} suite without {dtype}: {reason}; it would take hours "
                    f"(pass --dtypes {dtype} to run it anyway)",
                    file=sys.stderr,
                )
    methods, missing = {}, []
    for suite in plans:
        runnable, absent = suite_methods(suite)
        methods[suite] = [m for m in runnable if not args.methods or m in args.methods]
        missing += absent
    unknown = set(args.methods or []) - {m for suite in plans for m in suite_methods(suite)[0]}
    if unknown:
        parser.error(f"unknown or unavailable methods {sorted(unknown)}; available: {methods}")
    for m in missing:
        print(f"missing: {m}", file=sys.stderr)
    for plan in plans.values():
        overrides = dict(
            vocabs=args.vocabs,
            seq_lens=args.seq_lens,
            dtypes=args.dtypes,
            rounds=args.rounds,
            hidden=args.hidden,
        )
        for key, value in overrides.items():
            if value and key in plan:
                plan[key] = value
        if args.vocabs:
            plan["fixed_vocab"] = args.vocabs[0]
        if args.seq_lens:
            plan["fixed_seq"] = args.seq_lens[0]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    total = sum(len(points(s, p)) * len(p["dtypes"]) * len(methods[s]) for s, p in plans.items())
    print(f"fastdpo report: {total} points on {info['cpu']}", flush=True)
    rows = run(plans, methods, log=lambda s: print(s, flush=True))

    (out / "report.json").write_text(
        json.dumps({"machine": info, "plans": plans, "missing": missing, "rows": rows}, indent=1)
    )
    fields = sorted({k for r in rows for k in r if k != "times"})
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    brief = summary(rows, info, missing)
    (out / "report.md").write_text(brief + "\n## Every point\n\n" + markdown(rows, info, missing))
    written = charts(rows, plans, out)
    print(f"wrote {out}/report.json, report.csv, report.md, " + ", ".join(p.name for p in written))
    if args.readme:
        update_readme(pathlib.Path(args.readme), brief, written)
        print(f"updated the benchmark block of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
