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

import argparse
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.probe import status_kb
from benchmarks.trainer_steps import SETUPS, load_setup, make_assets

METHODS = ("fastdpo_trl", "trl")
DTYPES = ("float32", "bfloat16")


def trl_step(method: str, dtype: str, directory: pathlib.Path, output_dir: str):
    """A zero-argument function running one optimizer step of ``method``'s trainer, as its loop does."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    if method == "fastdpo_trl":
        from fastdpo.trl import DPOTrainer
    else:
        from trl import DPOTrainer

    setup = load_setup(directory)
    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)  # noqa: E731
    records = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch,
        max_length=setup.max_length,
        learning_rate=setup.lr,
        max_steps=1000,
        report_to=[],
        use_cpu=True,
        bf16=dtype == "bfloat16",
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = DPOTrainer(
        model=load(),
        ref_model=load(),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(directory),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    # What Trainer's loop does before the first step: wrap the model (accelerate's autocast for
    # bf16) and set the accumulation count.
    trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.current_gradient_accumulation_steps = 1
    batches = iter(trainer.get_train_dataloader())

    def step():
        nonlocal batches
        try:
            inputs = next(batches)
        except StopIteration:
            batches = iter(trainer.get_train_dataloader())
            inputs = next(batches)
        trainer.training_step(trainer.model_wrapped, inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)

    return step


def probe(method: str, dtype: str, directory: pathlib.Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        step = trl_step(method, dtype, directory, out)
        gc.collect()
        before = status_kb("VmRSS")  # models, reference, data and trainer built; no step yet
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
        for _ in range(3):  # the first creates AdamW's state; allocator pools settle
            step()
        result = {"step_peak_bytes": (status_kb("VmHWM") - before) * 1024, "loaded_rss_bytes": before * 1024}
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result.update(peak_rss_bytes=status_kb("VmHWM") * 1024)
        if times:
            result.update(times=times, median_s=statistics.median(times))
        return result


def probe_in_subprocess(method: str, dtype: str, directory: pathlib.Path, rounds: int) -> dict:
    """:func:`probe` in a fresh interpreter, so that neither trainer's allocations hide the other's."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.trl_steps",
        method,
        "--dtype",
        dtype,
        "--rounds",
        str(rounds),
        "--dir",
        str(directory),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} {dtype} probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(directory: pathlib.Path, rounds: int) -> dict:
    """Both trainers side by side for each dtype (fresh process each) and fastdpo / TRL ratios."""
    rows = {}
    for dtype in DTYPES:
        row = {method: probe_in_subprocess(method, dtype, directory, rounds) for method in METHODS}
        for key in ("median_s", "step_peak_bytes", "peak_rss_bytes"):
            row[f"ratio_{key}"] = row["fastdpo_trl"][key] / row["trl"][key]
        rows[dtype] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method", choices=[*METHODS, "compare"])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--size", choices=sorted(SETUPS), default="full", help="without --dir (default: full)"
    )
    parser.add_argument(
        "--dir", help="assets made by make_assets (default: make them in a temporary directory)"
    )
    args = parser.parse_args()
    run = compare if args.method == "compare" else lambda d, r: probe(args.method, args.dtype, d, r)
    if args.dir:
        print(json.dumps(run(pathlib.Path(args.dir), args.rounds)))
        return
    with tempfile.TemporaryDirectory() as directory:
        print(json.dumps(run(make_assets(pathlib.Path(directory), SETUPS[args.size]), args.rounds)))


if __name__ == "__main__":
    main()
