"""The ``fastdpo`` command: ``fastdpo train`` and ``fastdpo eval``.

``fastdpo train`` with no arguments runs the built-in default (see :mod:`fastdpo.train.default`).
Under ``torchrun --nproc_per_node=N -m fastdpo train ...`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import textwrap
import time

import torch

from fastdpo.train import run_dir  # issue 13 (trust): output-dir lock and ownership
from fastdpo.train.arguments import add_config_options, builtin_flags, config_from_args
from fastdpo.train.data import load_preference_data, pad_token_id
from fastdpo.train.default import DEFAULT_RUN, default_data, default_model
from fastdpo.train.dist import Runtime, barrier, close_distributed, init_distributed, rank_and_world
from fastdpo.train.evaluate import evaluate_pairs
from fastdpo.train.lm import PolicyLoss
from fastdpo.train.plot import plot_metrics
from fastdpo.train.reference import NoReference, OtherModel, Scorer
from fastdpo.train.trainer import DPOTrainer

__all__ = ["DEFAULT_RUN", "build_parser", "config_from_args", "main"]

TRAIN_EXAMPLES = """examples:
  fastdpo train                                   # built-in default: tiny GPT-2, shipped pairs, no download
  fastdpo train --model ./my-model --data pairs.jsonl --eval-data heldout.jsonl --output-dir runs/mine
  fastdpo train --model Qwen/Qwen2.5-0.5B --data pairs.jsonl --reference precompute --bf16
  torchrun --nproc_per_node=2 -m fastdpo train --model ./my-model --data pairs.jsonl
  fastdpo train --resume                          # continue the default run from its last checkpoint

data: JSONL, one {"prompt": ..., "chosen": ..., "rejected": ...} per line; strings, or lists of
{"role", "content"} messages rendered with the tokenizer's chat template. Records with a missing
field, an empty completion or a prompt that leaves no room within --max-length are skipped and
counted (--strict makes them errors); a line that is not JSON is an error naming file and line.

BUILTIN_DEFAULTS

output (in --output-dir): metrics.jsonl (one line per step, TRL's metric names, plus the
evaluations), training.png (loss, reward margin, accuracy over steps), checkpoint-<step>/ (model,
tokenizer and trainer state, written atomically) and final/ (the trained model and tokenizer).
A new run replaces only what earlier fastdpo runs wrote there; a directory holding anything else is
refused (--overwrite-output-dir writes next to it, never deleting it), and so is a directory another
run is writing into. --resume checks every file of the checkpoint first, and refuses options that
would change the run so far (see the README's Training section)."""
TRAIN_EXAMPLES = TRAIN_EXAMPLES.replace(
    "BUILTIN_DEFAULTS",
    textwrap.fill(
        "defaults: those shown are TRL's and apply with --model; without --model the built-in default "
        f"uses its own, each still overridable: {builtin_flags(DEFAULT_RUN)}.",
        width=100,
    ),
)
# `fastdpo eval` with no --model scores the built-in run, with the settings it was trained with.
EVAL_BUILTIN = {name: DEFAULT_RUN[name] for name in ("beta", "max_length")}


def _add_loading_options(group) -> None:
    group.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype the model is loaded in (default: float32; bf16 autocast is --bf16)",
    )
    group.add_argument(
        "--download",
        action="store_true",
        help="let from_pretrained download from the Hugging Face Hub (default: local files and cache only)",
    )
    group.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 for the built-in default's tiny model)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fastdpo`` parser: command-only options written here, the rest generated from DPOConfig."""
    parser = argparse.ArgumentParser(
        prog="fastdpo", description="Direct Preference Optimization with fused kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="DPO-train a causal LM (no arguments: the built-in default)",
        description="DPO-train a Hugging Face causal LM on preference pairs. With no arguments, trains the "
        "built-in default (a tiny GPT-2 built and cached on first use) to prefer absurd completions and "
        "prints preference accuracy before and after, on training and held-out pairs.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = t.add_argument_group("model and data")
    run.add_argument(
        "--model", help="model directory or Hugging Face cache name (default: the built-in tiny GPT-2)"
    )
    run.add_argument("--data", help="training pairs, JSONL (default: the shipped pairs)")
    run.add_argument("--eval-data", help="held-out pairs, JSONL, evaluated before and after training")
    run.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    run.add_argument("--no-plot", action="store_true", help="do not write training.png")
    _add_loading_options(run)
    reference = t.add_argument_group("reference")
    reference.add_argument(
        "--reference",
        choices=["copy", "precompute", "none"],
        default="copy",
        help="copy: a frozen copy of the model (default); precompute: reference log-probs computed "
        "once before training, no reference model kept; none: reference-free",
    )
    reference.add_argument(
        "--ref-model", help="a different reference model directory (default: the model itself)"
    )
    add_config_options(t, "train", builtin=DEFAULT_RUN)

    e = sub.add_parser(
        "eval",
        help="preference accuracy of a model on pairs (no arguments: the default run's result)",
        description="Preference accuracy of --model on --data: how often the implicit reward "
        "beta*(log pi - log ref) ranks chosen above rejected (with --ref-model) and how often the model's own "
        "log-probability does. With no arguments, evaluates runs/default/final against the built-in default "
        "model on the shipped training and held-out pairs.",
    )
    what = e.add_argument_group("model and data")
    what.add_argument("--model", help="model to evaluate (default: runs/default/final)")
    what.add_argument(
        "--ref-model",
        help="reference model for the implicit reward (default: the built-in model when --model is not "
        "given, else none: reference-free)",
    )
    what.add_argument("--data", nargs="+", help="JSONL file(s) of pairs (default: the shipped pairs)")
    _add_loading_options(what)
    add_config_options(e, "eval", builtin=EVAL_BUILTIN)
    for p in (t, e):  # issue 13 (trust): user errors are one line; --debug shows their traceback
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _rank() -> int:
    return rank_and_world()[0]


def say(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _default_model_path() -> pathlib.Path:
    if _rank() == 0:
        path = default_model(log=say)
    barrier()  # the other ranks load what rank 0 built
    return path if _rank() == 0 else default_model(log=say)


def load_model(path: str, dtype: str, download: bool):
    """``(model, tokenizer)`` with ``from_pretrained`` (local files only unless ``download``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    kwargs = dict(local_files_only=not download)
    # issue 13 (trust): say what is wrong rather than from_pretrained's message about repository names
    if not download and not os.path.exists(path) and not _in_hf_cache(path):
        missing = "no such model directory, nor a model in the Hugging Face cache (--download fetches it)"
        raise FileNotFoundError(f"{path}: {missing}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(path, **kwargs)


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository name either
        return False


def _fraction(r: dict | None, metric: str) -> str:
    """``"k/n  (p%)"`` of one split's evaluation result (``"n/a"`` without one)."""
    if not r:
        return "n/a"
    return f"{round(r[metric] * r['pairs'])}/{r['pairs']}  ({r[metric]:.0%})"


def accuracy_table(before: dict | None, after: dict, names: dict[str, str]) -> str:
    rows = [f"{'preference accuracy':<44}{'before':<16}after"]
    for split, label in names.items():
        if split not in after:
            continue
        for metric, how in (
            ("rewards/accuracies", "implicit reward"),
            ("logps/accuracies", "policy log-prob"),
        ):
            rows.append(
                f"  {label + ', ' + how:<42}{_fraction((before or {}).get(split), metric):<16}"
                f"{_fraction(after[split], metric)}"
            )
    return "\n".join(rows)


ACCURACY_LEGEND = """  implicit reward: beta*(log pi - log ref) ranks chosen above rejected (TRL's rewards/accuracies).
                   Before training the policy is the reference, every pair ties: 0 by definition.
  policy log-prob: the model itself gives the chosen completion the higher log-probability."""


def train_command(args) -> int:
    start = time.perf_counter()
    builtin = args.model is None
    # The built-in model is too small to gain from more threads; one keeps it fast on a busy machine.
    if args.threads or builtin:
        torch.set_num_threads(args.threads or 1)
    init_distributed()
    _quiet_transformers()
    if builtin:
        model_path = _default_model_path()
        shipped_train, shipped_heldout = default_data()
        data = args.data or shipped_train
        eval_data = args.eval_data or (None if args.data else shipped_heldout)
        base = dict(DEFAULT_RUN)
    else:
        if not args.data:
            raise ValueError("--data FILE.jsonl is required with --model")
        model_path, data, eval_data, base = args.model, args.data, args.eval_data, {}
    config = config_from_args(args, base)
    output_dir = pathlib.Path(config.output_dir)
    # issue 13 (trust): lock --output-dir and refuse files fastdpo did not write before loading anything;
    # released when the command ends (main's ExitStack), also on errors
    args.cleanup.enter_context(run_dir.RunDir.for_config(config, enabled=_rank() == 0).writing())
    barrier()

    model, tokenizer = load_model(str(model_path), args.dtype, args.download)
    # No local name for the reference model: with --reference precompute the trainer drops it after one pass.
    trainer = DPOTrainer(
        model,
        tokenizer,
        data,
        config=config,
        eval_data=eval_data,
        ref_model=load_model(args.ref_model, args.dtype, args.download)[0] if args.ref_model else None,
    )
    what = (
        "built-in default: tiny GPT-2 learning to prefer absurd completions" if builtin else str(model_path)
    )
    say(f"fastdpo train: {what}")
    say(
        f"  model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
        f"device {trainer.device}, {trainer.world} process(es), bf16 autocast {'on' if trainer.bf16 else 'off'}"
    )
    say(
        f"  loss on {'hidden states + LM head (FusedLinearDPOLoss, no logits)' if trainer.fused else 'logits (DPOLoss)'}"
        + ("" if trainer.fused else f": {trainer.fused_reason}")
    )
    for name, data in trainer.splits.items():
        say(f"  {name} data: {data.summary()}")
    say(f"  {trainer.total_steps} steps of {trainer.global_batch} pairs, output in {output_dir}/")

    names = {"train": "training pairs", "eval": "held-out pairs"}
    before = None if args.resume else trainer.evaluate()
    trainer.train(resume_from_checkpoint=args.resume or None)
    if before is None:  # resumed: the evaluation before training is in the checkpoint
        before = next((e for e in trainer.evaluations if e["step"] == 0), None)
    after = trainer.evaluate()
    final = trainer.save()
    if _rank() == 0:
        say("\n" + accuracy_table(before, after, names))
        say(ACCURACY_LEGEND)
        written = [output_dir / config.metrics_file, output_dir / f"checkpoint-{trainer.step}", final]
        if not args.no_plot:
            title = f"{'fastdpo built-in default' if builtin else model_path}: {trainer.total_steps} steps"
            # issue 13 (trust): the plot is marked as fastdpo's before it is written
            run_dir.record_file(output_dir, run_dir.PLOT)
            written.insert(
                1, plot_metrics(output_dir / config.metrics_file, output_dir / "training.png", title)
            )
        say(f"\nwrote {', '.join(map(str, written))}")
        say(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def eval_command(args) -> int:
    """Scores a model on pairs with :func:`evaluate_pairs`: no trainer, no optimizer."""
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    _quiet_transformers()
    model_path, ref_path, data = args.model, args.ref_model, args.data
    base = {}
    if model_path is None:
        model_path = pathlib.Path(DEFAULT_RUN["output_dir"]) / "final"
        if not (model_path / "config.json").is_file():
            raise ValueError(f"no trained model in {model_path}; run `fastdpo train` first")
        ref_path = ref_path or str(_default_model_path())
        base = dict(EVAL_BUILTIN)
    if data is None:
        data = [str(p) for p in default_data()]
    config = config_from_args(args, {**base, "reference_free": ref_path is None})
    runtime = Runtime.detect(config.device, config.bf16)
    model, tokenizer = load_model(str(model_path), args.dtype, args.download)
    policy = PolicyLoss.build(model.to(runtime.device), config)
    score = Scorer(runtime, average=config.average_log_prob, backend=config.backend, ld_alpha=config.ld_alpha)
    reference = NoReference()
    if ref_path:
        reference = OtherModel(load_model(ref_path, args.dtype, args.download)[0], score, config.fused_linear)
    say(
        f"fastdpo eval: {model_path}"
        + (f" against reference {ref_path}" if ref_path else " (reference-free)")
    )
    width = max(len(path) for path in data) + 4
    rows = [f"{'pairs':<{width}}{'implicit reward':<22}policy log-prob"]
    for path in data:
        pairs = load_preference_data(path, tokenizer, **config.data_options())
        result = evaluate_pairs(
            policy,
            reference,
            pairs,
            runtime,
            batch_size=config.per_device_eval_batch_size,
            pad_id=pad_token_id(tokenizer),
        )
        reward = _fraction(result, "rewards/accuracies")
        logps = _fraction(result, "logps/accuracies")
        rows.append(f"  {path:<{width - 2}}{reward:<22}{logps}")
    say("\n".join(rows))
    return 0


def error_line(error: BaseException) -> str:
    """One line for a user error: the message of an OSError with its file, whitespace folded."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with contextlib.ExitStack() as args.cleanup:  # what the command holds (the output-dir lock)
            return train_command(args) if args.command == "train" else eval_command(args)
    except (ValueError, OSError) as error:  # issue 13 (trust): bad paths, data, options, resume, output dir
        if args.debug:
            raise
        print(f"fastdpo: error: {error_line(error)}", file=sys.stderr, flush=True)
        return 2
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
