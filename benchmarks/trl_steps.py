"""One DPO training step of ``fastdpo.trl.DPOTrainer`` and of TRL 1.16's ``DPOTrainer``: the same
trainer class hierarchy, model, data and ``DPOConfig``; only the import differs.

    python -m benchmarks.trl_steps fastdpo_trl|trl --dtype float32|bfloat16 --rounds K [--size quick|full] [--dir DIR]
    python -m benchmarks.trl_steps compare --rounds K [--size full]  # both trainers, both dtypes, fresh processes

prints one JSON line measured in a fresh process, as benchmarks/trainer_steps.py does: the peak
resident memory of three training steps above what the process held once everything was built
(``step_peak_bytes``), the resident memory before the first step (``loaded_rss_bytes``), the
process's peak (``peak_rss_bytes``), and the times of ``K`` further steps and their median.

The set-up is benchmarks/trainer_steps.py's (``SETUPS``, read back from the assets directory;
``full``: GPT-2 4x256 built from a config, vocabulary 32000, 16 pairs of 96 prompt + 159
completion tokens (+ EOS), batch of 4 pairs, max_length 256): the same frozen reference model
loaded from the same directory, AdamW, gradient clipping at 1.0, no gradient checkpointing,
dropout off. ``float32``: float32 weights and ``bf16=False``;
``bfloat16``: float32 weights under bfloat16 autocast (``bf16=True``, TRL's default).
"""

from __future__ import annotations

import pathlib

from benchmarks.trainer_steps import command_line, measure, print_run, run_fresh, trl_step, with_ratios

METHODS = ("fastdpo_trl", "trl")
DTYPES = ("float32", "bfloat16")


def make_step(method: str, dtype: str, directory: pathlib.Path, output_dir: str):
    """A zero-argument function running one optimizer step of ``method``'s trainer, as its loop does."""
    if method == "fastdpo_trl":
        from fastdpo.trl import DPOTrainer
    else:
        from trl import DPOTrainer
    return trl_step(directory, output_dir, DPOTrainer, bf16=dtype == "bfloat16")


def probe(method: str, dtype: str, directory: pathlib.Path, rounds: int) -> dict:
    return measure(lambda out: make_step(method, dtype, directory, out), rounds)


def probe_in_subprocess(method: str, dtype: str, directory: pathlib.Path, rounds: int) -> dict:
    """:func:`probe` in a fresh interpreter, so that neither trainer's allocations hide the other's."""
    return run_fresh("benchmarks.trl_steps", [method, "--dtype", dtype], directory, rounds)


def compare(directory: pathlib.Path, rounds: int) -> dict:
    """Both trainers side by side for each dtype (fresh process each) and fastdpo / TRL ratios."""
    rows = {}
    for dtype in DTYPES:
        row = {method: probe_in_subprocess(method, dtype, directory, rounds) for method in METHODS}
        rows[dtype] = with_ratios(row, "fastdpo_trl", "trl")
    return rows


def main() -> None:
    parser = command_line(__doc__, list(METHODS))
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    print_run(
        args, compare if args.method == "compare" else lambda d, r: probe(args.method, args.dtype, d, r)
    )


if __name__ == "__main__":
    main()
