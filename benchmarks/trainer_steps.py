"""One DPO training step of fastdpo's DPOTrainer and of TRL 1.16's DPOTrainer, set up identically.

    python -m benchmarks.trainer_steps METHOD --rounds K [--size quick|full] [--dir DIR]
    python -m benchmarks.trainer_steps compare --rounds K [--size full]  # fastdpo and TRL, fresh processes, ratios

(METHOD: a key of ``STEPS``) prints one JSON line measured in this (fresh) process: the peak
resident memory of three training steps above what the process held once the models, data and
trainer were built (``step_peak_bytes``: activations, gradients, AdamW's state, loss buffers;
measured this way because the allocator keeps freed pages, so a later step alone can look free),
the resident memory before the first step (``loaded_rss_bytes``), the process's peak
(``peak_rss_bytes``), and the times of ``K`` further steps and their median.

Both trainers get the same GPT-2 (built from a config, saved, reloaded with ``from_pretrained``),
the same frozen reference model (loaded from the same directory), the same data (every pair is
``prompt`` prompt tokens + ``completion`` completion tokens and EOS, so batches pad the same
whatever the order), float32, no gradient checkpointing, dropout off, AdamW at the same learning
rate, gradient clipping at 1.0, the same batch size and max_length; ``SETUPS`` holds the sizes
(``full``: 4 layers, hidden 256, vocabulary 32000, batches of 4 pairs of 256 tokens). A step is
forward and backward of policy and reference on one batch, clipping, the optimizer and scheduler
steps, zeroing the gradients. Adding a trainer is one entry in ``STEPS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.probe import status_kb


@dataclasses.dataclass(frozen=True)
class Setup:
    """Model, data and batch sizes of one trainer benchmark."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    pairs: int  # in the dataset
    batch: int  # pairs per step
    prompt: int  # tokens per prompt
    completion: int  # tokens per completion, before EOS
    max_length: int
    max_prompt_length: int
    lr: float = 1e-5


SETUPS = {
    "quick": Setup(
        n_layer=2,
        n_embd=128,
        n_head=4,
        vocab=8000,
        pairs=8,
        batch=2,
        prompt=48,
        completion=79,
        max_length=128,
        max_prompt_length=64,
    ),
    "full": Setup(
        n_layer=4,
        n_embd=256,
        n_head=4,
        vocab=32000,
        pairs=16,
        batch=4,
        prompt=96,
        completion=159,
        max_length=256,
        max_prompt_length=128,
    ),
}
SETUP_FILE = "bench_setup.json"


def make_assets(directory: pathlib.Path, setup: Setup) -> pathlib.Path:
    """Word-level tokenizer of ``setup.vocab`` words, the GPT-2 and the pairs, saved in ``directory``
    with the setup itself (``bench_setup.json``), which the steps read back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    v = setup.vocab
    words = {f"w{i}": i for i in range(v - 2)} | {"<eos>": v - 2, "<pad>": v - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=v,
        bos_token_id=v - 2,
        eos_token_id=v - 2,
        pad_token_id=v - 1,
        n_layer=setup.n_layer,
        n_embd=setup.n_embd,
        n_head=setup.n_head,
        n_positions=2 * setup.max_length,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)

    def text(n: int, lead: str) -> str:
        return lead + " ".join(f"w{i}" for i in torch.randint(0, v - 2, (n,), generator=gen).tolist())

    with open(directory / "pairs.jsonl", "w") as f:
        for _ in range(setup.pairs):
            record = {
                "prompt": text(setup.prompt, ""),
                "chosen": text(setup.completion, " "),
                "rejected": text(setup.completion, " "),
            }
            f.write(json.dumps(record) + "\n")
    (directory / SETUP_FILE).write_text(json.dumps(dataclasses.asdict(setup)))
    return directory


def load_setup(directory: pathlib.Path) -> Setup:
    return Setup(**json.loads((directory / SETUP_FILE).read_text()))


def _load(directory: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)  # noqa: E731
    return load(), load(), AutoTokenizer.from_pretrained(directory)


def fastdpo_step(directory: pathlib.Path, output_dir: str, fused_linear: bool | None = None):
    """A zero-argument function running one optimizer step of fastdpo's DPOTrainer."""
    from fastdpo import DPOConfig, DPOTrainer

    setup = load_setup(directory)
    model, ref_model, tokenizer = _load(directory)
    config = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch,
        max_length=setup.max_length,
        max_prompt_length=setup.max_prompt_length,
        learning_rate=setup.lr,
        max_steps=1000,
        progress_bar=False,
        metrics_file="",
        fused_linear=fused_linear,
    )
    trainer = DPOTrainer(model, tokenizer, str(directory / "pairs.jsonl"), config=config, ref_model=ref_model)
    trainer.model.train()
    steps = iter(range(10**9))
    return lambda: trainer.training_step(trainer._step_indices(next(steps)))


def trl_step(directory: pathlib.Path, output_dir: str, trainer_class=None, bf16: bool = False):
    """A zero-argument function running one optimizer step of TRL's DPOTrainer, as its loop does.

    ``trainer_class``: TRL's ``DPOTrainer`` (the default) or a subclass such as
    ``fastdpo.trl.DPOTrainer``; ``bf16``: TRL's option (float32 weights under bfloat16 autocast).
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    setup = load_setup(directory)
    model, ref_model, tokenizer = _load(directory)
    records = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=setup.batch,
        max_length=setup.max_length,
        learning_rate=setup.lr,
        max_steps=1000,
        report_to=[],
        use_cpu=True,
        bf16=bf16,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    data = Dataset.from_list(records)
    trainer = (trainer_class or DPOTrainer)(
        model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    # What Trainer's loop does before the first step: wrap the model (accelerate's autocast for
    # bf16; in float32 on CPU the model itself) and set the accumulation count.
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


def fastdpo_logits_step(directory: pathlib.Path, output_dir: str):
    """fastdpo's DPOTrainer on the model's logits (DPOLoss) instead of the fused linear path."""
    return fastdpo_step(directory, output_dir, fused_linear=False)


STEPS = {"fastdpo": fastdpo_step, "fastdpo_logits": fastdpo_logits_step, "trl": trl_step}


def measure(make_step: Callable[[str], Callable[[], None]], rounds: int) -> dict:
    """Memory and times of the step ``make_step(output_dir)`` builds (see the module docstring)."""
    with tempfile.TemporaryDirectory() as out:
        step = make_step(out)
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


def probe(method: str, directory: pathlib.Path, rounds: int) -> dict:
    return measure(lambda out: STEPS[method](directory, out), rounds)


def run_fresh(
    module: str, arguments: list[str], directory: pathlib.Path, rounds: int, timeout: float | None = None
) -> dict:
    """``python -m module *arguments --rounds K --dir DIR`` in a fresh interpreter (so that no
    trainer's allocations hide another's): the JSON line it prints last."""
    command = [sys.executable, "-m", module, *arguments, "--rounds", str(rounds), "--dir", str(directory)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe_in_subprocess(
    method: str, directory: pathlib.Path, rounds: int, timeout: float | None = None
) -> dict:
    """:func:`probe` in a fresh interpreter, so that neither trainer's allocations hide the other's."""
    return run_fresh("benchmarks.trainer_steps", [method], directory, rounds, timeout)


def compare(directory: pathlib.Path, rounds: int) -> dict:
    """Both trainers side by side (fresh process each) and fastdpo / TRL ratios."""
    rows = {method: probe_in_subprocess(method, directory, rounds) for method in ("fastdpo", "trl")}
    return with_ratios(rows, "fastdpo", "trl")


def with_ratios(rows: dict, ours: str, theirs: str) -> dict:
    """``rows`` (one per trainer) with the ratios ``ours`` / ``theirs`` of time and memory."""
    for key in ("median_s", "step_peak_bytes", "peak_rss_bytes"):
        rows[f"ratio_{key}"] = rows[ours][key] / rows[theirs][key]
    return rows


def command_line(doc: str, methods: list[str]) -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.<module> METHOD|compare --rounds K [--size] [--dir]``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=[*methods, "compare"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--size", choices=sorted(SETUPS), default="full", help="without --dir (default: full)"
    )
    parser.add_argument(
        "--dir", help="assets made by make_assets (default: make them in a temporary directory)"
    )
    return parser


def print_run(args: argparse.Namespace, run: Callable[[pathlib.Path, int], dict]) -> None:
    """Print ``run(assets directory, rounds)`` as one JSON line; the assets are ``--dir``'s, or made
    for ``--size`` in a temporary directory."""
    if args.dir:
        print(json.dumps(run(pathlib.Path(args.dir), args.rounds)))
        return
    with tempfile.TemporaryDirectory() as directory:
        print(json.dumps(run(make_assets(pathlib.Path(directory), SETUPS[args.size]), args.rounds)))


def main() -> None:
    args = command_line(__doc__, sorted(STEPS)).parse_args()
    print_run(args, compare if args.method == "compare" else lambda d, r: probe(args.method, d, r))


if __name__ == "__main__":
    main()
