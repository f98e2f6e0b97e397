"""The ``fastdpo`` command: ``fastdpo train`` and ``fastdpo eval``.

``fastdpo train`` with no arguments runs the built-in default (see :mod:`fastdpo.default`).
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

from fastdpo import run_dir  # issue 13 (trust): output-dir lock and ownership
from fastdpo.trainer import DPOConfig

# The built-in default: a tiny GPT-2 learning, from 32 pairs, to prefer absurd completions.
DEFAULT_RUN = dict(
    output_dir="runs/default", learning_rate=1e-3, beta=0.02, num_train_epochs=15, per_device_train_batch_size=8,
    max_length=64, max_prompt_length=32, warmup_ratio=0.1, lr_scheduler_type="cosine", eval_steps=5,
)  # fmt: skip
# Options whose command-line flag differs from the DPOConfig field.
FLAGS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler",
}  # fmt: skip

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


_BUILTIN = " ".join(f"--{FLAGS.get(k, k).replace('_', '-')} {v}" for k, v in DEFAULT_RUN.items())
TRAIN_EXAMPLES = TRAIN_EXAMPLES.replace(
    "BUILTIN_DEFAULTS",
    textwrap.fill(f"defaults: those shown are TRL's and apply with --model; without --model the built-in default "
                  f"uses its own, each still overridable: {_BUILTIN}.", width=100),
)  # fmt: skip


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=int, help="max tokens of prompt + completion (default 1024)")
    p.add_argument(
        "--max-prompt-length",
        type=int,
        help="prompts keep their last N tokens (default 512, or half of a smaller --max-length; "
        "0: never truncate, skip what does not fit)",
    )
    p.add_argument("--strict", action="store_true", help="bad records are errors instead of counted skips")
    p.add_argument("--eval-batch-size", type=int, help="pairs per evaluation batch (default 8)")
    p.add_argument("--beta", type=float, help="DPO temperature beta (default 0.1)")
    p.add_argument("--loss-type", nargs="+", help="loss type(s), TRL's names (default sigmoid)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="dtype the model is loaded in (default float32; bf16 autocast is --bf16)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="let from_pretrained download from the Hugging Face Hub (default: local files and cache only)",
    )
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice; 1 for the built-in default's tiny model)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdpo", description="Direct Preference Optimization with fused kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="DPO-train a causal LM (no arguments: the built-in default)",
        description="DPO-train a Hugging Face causal LM on preference pairs. With no arguments, trains the "
        "built-in default (a tiny GPT-2 built and cached on first use) to prefer absurd completions and "
        "prints preference accuracy before and after, on training and held-out pairs.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    t.add_argument(
        "--model", help="model directory or Hugging Face cache name (default: the built-in tiny GPT-2)"
    )
    t.add_argument("--data", help="training pairs, JSONL (default: the shipped pairs)")
    t.add_argument("--eval-data", help="held-out pairs, JSONL, evaluated before and after training")
    t.add_argument(
        "--output-dir", help="where metrics, plot and checkpoints go (default runs/default or runs/fastdpo)"
    )
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    t.add_argument(  # issue 13 (trust)
        "--overwrite-output-dir",
        action="store_true",
        help="write into an --output-dir that holds files fastdpo did not write (they are kept)",
    )
    t.add_argument("--reference", choices=["copy", "precompute", "none"], default="copy",
                   help="copy: a frozen copy of the model (default); precompute: reference log-probs computed "
                   "once before training, no reference model kept; none: reference-free")  # fmt: skip
    t.add_argument("--ref-model", help="a different reference model directory (default: the model itself)")
    t.add_argument("--epochs", type=float, help="training epochs (default 3)")
    t.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    t.add_argument("--batch-size", type=int, help="pairs per device per micro-batch (default 8)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-6)")
    t.add_argument(
        "--lr-scheduler",
        choices=["linear", "cosine", "constant"],
        help="decay after warm-up (default linear)",
    )
    t.add_argument("--warmup-ratio", type=float, help="fraction of steps of linear warm-up (default 0)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0: off)")
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast (default: only on CUDA devices that support it)")  # fmt: skip
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument(
        "--no-fused-linear", action="store_true", help="compute the loss from logits, not hidden states"
    )
    t.add_argument("--seed", type=int, help="seed of the data order and RNGs (default 42)")
    t.add_argument(
        "--eval-steps", type=int, help="evaluate every N steps too (default: before and after only)"
    )
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: at the end only)")
    t.add_argument("--save-total-limit", type=int, help="keep only the last N checkpoints")
    t.add_argument("--no-plot", action="store_true", help="do not write training.png")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_options(t)

    e = sub.add_parser(
        "eval", help="preference accuracy of a model on pairs (no arguments: the default run's result)",
        description="Preference accuracy of --model on --data: how often the implicit reward "
        "beta*(log pi - log ref) ranks chosen above rejected (with --ref-model) and how often the model's own "
        "log-probability does. With no arguments, evaluates runs/default/final against the built-in default "
        "model on the shipped training and held-out pairs.",
    )  # fmt: skip
    e.add_argument("--model", help="model to evaluate (default: runs/default/final)")
    e.add_argument("--ref-model", help="reference model for the implicit reward (default: the built-in model "
                   "when --model is not given, else none: reference-free)")  # fmt: skip
    e.add_argument("--data", nargs="+", help="JSONL file(s) of pairs (default: the shipped pairs)")
    _add_data_options(e)
    for p in (t, e):  # issue 13 (trust): user errors are one line; --debug shows their traceback
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def _init_distributed() -> None:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _default_model_path() -> pathlib.Path:
    from fastdpo.default import default_model

    if _rank() == 0:
        path = default_model(log=say)
    _barrier()  # the other ranks load what rank 0 built
    return path if _rank() == 0 else default_model(log=say)


def load_model(path: str, dtype: str, download: bool):
    """``(model, tokenizer)`` with ``from_pretrained`` (local files only unless ``download``)."""
    import torch
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


def config_from_args(args, base: dict) -> DPOConfig:
    """DPOConfig from ``base`` overridden by every option given on the command line."""
    options = dict(base)
    for field in DPOConfig.__dataclass_fields__:
        value = getattr(args, FLAGS.get(field, field), None)
        if value is not None and value is not False:
            options[field] = value
    if getattr(args, "bf16", None) is not None:  # --no-bf16 is an explicit False
        options["bf16"] = args.bf16
    if getattr(args, "loss_type", None):
        options["loss_type"] = args.loss_type if len(args.loss_type) > 1 else args.loss_type[0]
    if getattr(args, "max_prompt_length", None) == 0:
        options["max_prompt_length"] = None
    elif args.max_length and args.max_prompt_length is None:  # keep the default prompt share consistent
        if options.get("max_prompt_length", DPOConfig.max_prompt_length) >= args.max_length:
            options["max_prompt_length"] = args.max_length // 2
    if getattr(args, "strict", False):
        options["strict_data"] = True
    if getattr(args, "no_fused_linear", False):
        options["fused_linear"] = False
    if getattr(args, "no_progress", False):
        options["progress_bar"] = False
    if hasattr(args, "reference"):
        options["precompute_ref_log_probs"] = args.reference == "precompute"
        options["reference_free"] = args.reference == "none"
    return DPOConfig(**options)


def _fraction(result: dict | None, split: str, metric: str) -> str:
    if not result or split not in result:
        return "n/a"
    r = result[split]
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
                f"  {label + ', ' + how:<42}{_fraction(before, split, metric):<16}{_fraction(after, split, metric)}"
            )
    return "\n".join(rows)


ACCURACY_LEGEND = """  implicit reward: beta*(log pi - log ref) ranks chosen above rejected (TRL's rewards/accuracies).
                   Before training the policy is the reference, every pair ties: 0 by definition.
  policy log-prob: the model itself gives the chosen completion the higher log-probability."""


def train_command(args) -> int:
    import torch

    from fastdpo import DPOTrainer
    from fastdpo.default import default_data

    start = time.perf_counter()
    builtin = args.model is None
    # The built-in model is too small to gain from more threads; one keeps it fast on a busy machine.
    if args.threads or builtin:
        torch.set_num_threads(args.threads or 1)
    _init_distributed()
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
        model_path, data, eval_data, base = (
            args.model,
            args.data,
            args.eval_data,
            {"output_dir": "runs/fastdpo"},
        )
    config = config_from_args(args, base)
    output_dir = pathlib.Path(config.output_dir)
    # issue 13 (trust): lock --output-dir and refuse files fastdpo did not write before loading anything;
    # released when the command ends (main's ExitStack), also on errors
    claim = run_dir.RunDir(output_dir, config.metrics_file, config.overwrite_output_dir, enabled=_rank() == 0)
    args.cleanup.enter_context(claim.writing())
    _barrier()

    model, tokenizer = load_model(str(model_path), args.dtype, args.download)
    # No local name for the reference model: with --reference precompute the trainer drops it after one pass.
    trainer = DPOTrainer(
        model, tokenizer, data, config=config, eval_data=eval_data,
        ref_model=load_model(args.ref_model, args.dtype, args.download)[0] if args.ref_model else None,
    )  # fmt: skip
    what = (
        "built-in default: tiny GPT-2 learning to prefer absurd completions" if builtin else str(model_path)
    )
    say(f"fastdpo train: {what}")
    say(f"  model {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
        f"device {trainer.device}, {trainer.world} process(es), bf16 autocast {'on' if trainer.bf16 else 'off'}")  # fmt: skip
    say(f"  loss on {'hidden states + LM head (FusedLinearDPOLoss, no logits)' if trainer.fused else 'logits (DPOLoss)'}"
        + ("" if trainer.fused else f": {trainer.fused_reason}"))  # fmt: skip
    for name, split in trainer.splits.items():
        say(f"  {name} data: {split.data.summary()}")
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
            from fastdpo.plot import plot_metrics

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
    import torch

    from fastdpo import DPOTrainer
    from fastdpo.default import default_data

    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_transformers()
    model_path, ref_path, data = args.model, args.ref_model, args.data
    base = {}
    if model_path is None:
        model_path = pathlib.Path(DEFAULT_RUN["output_dir"]) / "final"
        if not (model_path / "config.json").is_file():
            raise ValueError(f"no trained model in {model_path}; run `fastdpo train` first")
        ref_path = ref_path or str(_default_model_path())
        base = {k: DEFAULT_RUN[k] for k in ("beta", "max_length", "max_prompt_length")}
    if data is None:
        data = [str(p) for p in default_data()]
    options = {**base, "reference_free": ref_path is None, "progress_bar": False, "metrics_file": ""}
    config = config_from_args(args, options)
    model, tokenizer = load_model(str(model_path), args.dtype, args.download)
    ref_model = load_model(ref_path, args.dtype, args.download)[0] if ref_path else None
    trainer = DPOTrainer(model, tokenizer, data[0], config=config, ref_model=ref_model)
    print(
        f"fastdpo eval: {model_path}"
        + (f" against reference {ref_path}" if ref_path else " (reference-free)")
    )
    width = max(len(path) for path in data) + 4
    rows = [f"{'pairs':<{width}}{'implicit reward':<22}policy log-prob"]
    for path in data:
        r = trainer.evaluate(path, name=path)
        reward, logps = _fraction(r, path, "rewards/accuracies"), _fraction(r, path, "logps/accuracies")
        rows.append(f"  {path:<{width - 2}}{reward:<22}{logps}")
    print("\n".join(rows))
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
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
