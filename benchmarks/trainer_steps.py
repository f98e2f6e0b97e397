"""One DPO training step of fastdpo's DPOTrainer and of TRL 1.16's DPOTrainer, set up identically.

    python -m benchmarks.trainer_steps fastdpo|trl --rounds K [--dir DIR]
    python -m benchmarks.trainer_steps compare --rounds K    # both, each in a fresh process, and the ratios

prints one JSON line measured in this (fresh) process: the peak resident memory of three training
steps above what the process held once the models, data and trainer were built
(``step_peak_bytes``: activations, gradients, AdamW's state, loss buffers; measured this way
because the allocator keeps freed pages, so a later step alone can look free), the resident memory
before the first step (``loaded_rss_bytes``), the process's peak (``peak_rss_bytes``), and the
times of ``K`` further steps and their median.

Both trainers get the same GPT-2 (built from a config, saved, reloaded with ``from_pretrained``),
the same frozen reference model (loaded from the same directory), the same data (every pair is
96 prompt tokens + 160 completion tokens with EOS, so batches pad the same whatever the order),
float32, no gradient checkpointing, dropout off, AdamW at the same learning rate, gradient
clipping at 1.0, the same batch size and max_length. A step is forward and backward of policy
and reference on one batch, clipping, the optimizer and scheduler steps, zeroing the gradients.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import tempfile
import time

import torch

from benchmarks.probe import status_kb

MODEL = dict(n_layer=4, n_embd=256, n_head=4, n_positions=512)
VOCAB, PAIRS, BATCH, PROMPT, COMPLETION, MAX_LENGTH, LR = 32000, 16, 4, 96, 159, 256, 1e-5


def make_assets(directory: pathlib.Path) -> pathlib.Path:
    """Word-level tokenizer of VOCAB words, the GPT-2 and the pairs, saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB - 2)} | {"<eos>": VOCAB - 2, "<pad>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1,
                        **MODEL)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)

    def text(n: int, lead: str) -> str:
        return lead + " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 2, (n,), generator=gen).tolist())

    with open(directory / "pairs.jsonl", "w") as f:
        for _ in range(PAIRS):
            record = {
                "prompt": text(PROMPT, ""),
                "chosen": text(COMPLETION, " "),
                "rejected": text(COMPLETION, " "),
            }
            f.write(json.dumps(record) + "\n")
    return directory


def _load(directory: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)  # noqa: E731
    return load(), load(), AutoTokenizer.from_pretrained(directory)


def fastdpo_step(directory: pathlib.Path, output_dir: str, fused_linear: bool | None = None):
    """A zero-argument function running one optimizer step of fastdpo's DPOTrainer."""
    from fastdpo import DPOConfig, DPOTrainer

    model, ref_model, tokenizer = _load(directory)
    config = DPOConfig(output_dir=output_dir, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                       max_prompt_length=128, learning_rate=LR, max_steps=1000, progress_bar=False,
                       metrics_file="", fused_linear=fused_linear)  # fmt: skip
    trainer = DPOTrainer(model, tokenizer, str(directory / "pairs.jsonl"), config=config, ref_model=ref_model)
    trainer.model.train()
    steps = iter(range(10**9))
    return lambda: trainer.training_step(trainer._step_indices(next(steps)))


def trl_step(directory: pathlib.Path, output_dir: str):
    """A zero-argument function running one optimizer step of TRL's DPOTrainer, as its loop does."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, ref_model, tokenizer = _load(directory)
    records = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     learning_rate=LR, max_steps=1000, report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, save_strategy="no", logging_steps=10**6,
                     dataloader_num_workers=0, max_grad_norm=1.0)  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    batches = iter(trainer.get_train_dataloader())

    def step():
        nonlocal batches
        try:
            inputs = next(batches)
        except StopIteration:
            batches = iter(trainer.get_train_dataloader())
            inputs = next(batches)
        trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)

    return step


def fastdpo_logits_step(directory: pathlib.Path, output_dir: str):
    """fastdpo's DPOTrainer on the model's logits (DPOLoss) instead of the fused linear path."""
    return fastdpo_step(directory, output_dir, fused_linear=False)


STEPS = {"fastdpo": fastdpo_step, "fastdpo_logits": fastdpo_logits_step, "trl": trl_step}


def probe(method: str, directory: pathlib.Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        step = STEPS[method](directory, out)
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


def probe_in_subprocess(
    method: str, directory: pathlib.Path, rounds: int, timeout: float | None = None
) -> dict:
    """:func:`probe` in a fresh interpreter, so that neither trainer's allocations hide the other's."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "benchmarks.trainer_steps",
        method,
        "--rounds",
        str(rounds),
        "--dir",
        str(directory),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{method} probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(directory: pathlib.Path, rounds: int) -> dict:
    """Both trainers side by side (fresh process each) and fastdpo / TRL ratios."""
    rows = {method: probe_in_subprocess(method, directory, rounds) for method in ("fastdpo", "trl")}
    for key in ("median_s", "step_peak_bytes", "peak_rss_bytes"):
        rows[f"ratio_{key}"] = rows["fastdpo"][key] / rows["trl"][key]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method", choices=sorted(STEPS) + ["compare"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--dir", help="assets made by make_assets (default: make them in a temporary directory)"
    )
    args = parser.parse_args()
    run = compare if args.method == "compare" else lambda d, r: probe(args.method, d, r)
    if args.dir:
        print(json.dumps(run(pathlib.Path(args.dir), args.rounds)))
        return
    with tempfile.TemporaryDirectory() as directory:
        print(json.dumps(run(make_assets(pathlib.Path(directory)), args.rounds)))


if __name__ == "__main__":
    main()
