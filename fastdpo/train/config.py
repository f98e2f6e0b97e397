"""``DPOConfig``: every training option, with its default and help text in one place.

Names and defaults follow TRL's ``DPOConfig`` where it has the option. Each field carries its help
text (and, for the command line, its group, a short flag or a choice list) in ``metadata``, as TRL
does; ``fastdpo train`` builds its parser from these fields (:mod:`fastdpo.train.arguments`), so a
default or a help text is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from fastdpo.functional import (
    F_DIVERGENCES,
    LOSS_TYPES,
    check_ld_alpha,
    check_loss_options,
    check_use_weighting,
)

LR_SCHEDULERS = ("linear", "cosine", "constant")
PROMPT_BUDGET = 512  # max_prompt_length="auto": this, or half of a max_length that is not larger


def option(default: Any, help: str, group: str, **cli: Any):
    """A dataclass field with its default and ``metadata``: ``help``, ``group`` and command-line extras
    (``flag``: a shorter flag name; ``choices``; ``zero_is_none``: 0 on the command line
    means None; ``cli=False``: not an option of its own)."""
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass
class DPOConfig:
    """Training options of :class:`fastdpo.DPOTrainer` (see each field's ``metadata["help"]``)."""

    output_dir: str = option("runs/fastdpo", "Where metrics, checkpoints and the final model go.", "output")
    overwrite_output_dir: bool = option(
        False,
        "Write into an output_dir that holds files fastdpo did not write (they are kept, never deleted; "
        "without this such a directory is refused).",
        "output",
    )

    # loss (see fastdpo.DPOLoss)
    beta: float = option(
        0.1,
        "Temperature of the implicit reward beta * (log pi - log ref); higher keeps closer to the "
        "reference (for ipo it is the regulariser tau).",
        "loss",
    )
    loss_type: str | list[str] = option(
        "sigmoid",
        "Loss type, TRL's names; several are summed with loss_weights.",
        "loss",
        choices=LOSS_TYPES,
    )
    loss_weights: list[float] | None = option(
        None, "Weight of each loss type when several are given (None: 1 each).", "loss"
    )
    label_smoothing: float = option(
        0.0, "Probability that a label is flipped (robust, cDPO) or EXO's epsilon.", "loss"
    )
    average_log_prob: bool = option(
        False, "Average the completion log-probs over their tokens instead of summing them.", "loss"
    )
    f_divergence_type: str = option(
        "reverse_kl",
        "f-divergence between policy and reference (f-DPO); a non-default value works with "
        "the losses built on the chosen-rejected score difference.",
        "loss",
        choices=F_DIVERGENCES,
    )
    f_alpha_divergence_coef: float = option(0.5, "alpha of f_divergence_type=alpha_divergence.", "loss")
    discopop_tau: float = option(0.05, "Temperature of the discopop loss (DiscoPOP's tau).", "loss")
    simpo_gamma: float = option(0.5, "Target reward margin of the simpo loss.", "loss")
    use_weighting: bool = option(
        False,
        "WPO: weight each pair's loss by the policy's length-normalised probabilities of its two "
        "completions (not with aot losses).",
        "loss",
    )
    ld_alpha: float | None = option(
        None,
        "LD-DPO: weight, in [0, 1], of the completion tokens past the length the pair's chosen and "
        "rejected completions share (None: off, as 1).",
        "loss",
    )

    # reference: a frozen copy of the model (default), log-probs precomputed once, or none
    precompute_ref_log_probs: bool = option(
        False,
        "Compute the reference log-probs of every pair once before training and keep no reference model.",
        "reference",
        cli=False,
    )
    reference_free: bool = option(
        False, "No reference: the loss uses the policy alone.", "reference", cli=False
    )

    # data
    max_length: int = option(1024, "Max tokens of prompt + completion.", "data")
    max_prompt_length: int | Literal["auto"] | None = option(
        "auto",
        f"Prompts keep their last N tokens. auto: {PROMPT_BUDGET}, or half of a max_length that is "
        f"not larger than {PROMPT_BUDGET}. None (0 on the command line): never truncate; skip prompts "
        "that do not fit.",
        "data",
        zero_is_none=True,
    )
    strict_data: bool = option(
        False, "A bad record is an error instead of a counted skip.", "data", flag="strict"
    )

    # optimisation
    learning_rate: float = option(1e-6, "Peak learning rate of AdamW.", "optimisation", flag="lr")
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and norms).", "optimisation")
    adam_beta1: float = option(0.9, "AdamW beta1.", "optimisation")
    adam_beta2: float = option(0.999, "AdamW beta2.", "optimisation")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", "optimisation")
    lr_scheduler_type: str = option(
        "linear", "Decay after warm-up.", "optimisation", flag="lr-scheduler", choices=LR_SCHEDULERS
    )
    warmup_ratio: float = option(0.0, "Fraction of the steps of linear warm-up.", "optimisation")
    warmup_steps: int = option(0, "Steps of linear warm-up; overrides warmup_ratio when > 0.", "optimisation")
    num_train_epochs: float = option(3.0, "Training epochs.", "optimisation", flag="epochs")
    max_steps: int = option(-1, "Optimizer steps; overrides num_train_epochs when > 0.", "optimisation")
    per_device_train_batch_size: int = option(
        8, "Pairs per device per micro-batch.", "optimisation", flag="batch-size"
    )
    per_device_eval_batch_size: int = option(
        8, "Pairs per device per evaluation batch.", "optimisation", flag="eval-batch-size"
    )
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimizer step.", "optimisation", flag="grad-accum"
    )
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", "optimisation")
    bf16: bool | None = option(
        None, "bfloat16 autocast (None: only on a CUDA device that supports it).", "execution"
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward.", "execution")
    disable_dropout: bool = option(True, "Turn dropout off in the model (as TRL does).", "optimisation")
    seed: int = option(42, "Seed of the data order and of every RNG.", "optimisation")

    # execution
    fused_linear: bool | None = option(
        None,
        "Compute the loss from hidden states and the LM head, never the logits (None: whenever "
        "that reproduces the model's logits).",
        "execution",
    )
    backend: str = option(
        "auto", "Kernel backend of the log-probs: auto, triton, native or torch.", "execution"
    )
    device: str | None = option(
        None, "Device (None: cuda, the local rank's under torchrun, if available, else cpu).", "execution"
    )

    # logging and checkpoints
    token_metrics: bool = option(
        False,
        "Also log TRL's entropy and mean_token_accuracy, from token statistics of the loss's own "
        "pass (the native fused linear loss then recomputes the logits in the backward).",
        "output",
    )
    metrics_file: str = option(
        "metrics.jsonl", "File in output_dir with a line per step and evaluation ('' for none).", "output"
    )
    eval_steps: int = option(0, "Evaluate every N steps during training (0: never).", "output")
    save_steps: int = option(0, "Checkpoint every N steps (0: only at the end).", "output")
    save_total_limit: int | None = option(None, "Keep only the last N checkpoints (None: all).", "output")
    progress_bar: bool = option(True, "Show a progress bar.", "output", flag="progress")

    def __post_init__(self) -> None:
        for f in fields(self):  # loss_type's choices are checked, one by one, with the other loss options
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and f.name != "loss_type" and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        types, _ = check_loss_options(
            self.loss_type, self.loss_weights, self.beta, self.label_smoothing, self.f_divergence_type
        )
        check_use_weighting(self.use_weighting, types)
        check_ld_alpha(self.ld_alpha)
        if not isinstance(self.token_metrics, bool):
            raise TypeError(f"token_metrics must be True or False, got {self.token_metrics!r}")
        if self.precompute_ref_log_probs and self.reference_free:
            raise ValueError("precompute_ref_log_probs and reference_free are exclusive: pick one reference")
        if self.max_prompt_length == "auto":
            self.max_prompt_length = (
                PROMPT_BUDGET if PROMPT_BUDGET < self.max_length else self.max_length // 2
            )
        elif self.max_prompt_length is not None and type(self.max_prompt_length) is not int:
            raise ValueError(
                f"max_prompt_length must be an int, 'auto' or None, got {self.max_prompt_length!r}"
            )
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length}) "
                "to leave room for the completion (or None to skip prompts that do not fit)"
            )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`fastdpo.DPOLoss` / :class:`fastdpo.FusedLinearDPOLoss`."""
        names = (
            "beta",
            "loss_type",
            "loss_weights",
            "label_smoothing",
            "reference_free",
            "average_log_prob",
            "backend",
            "f_divergence_type",
            "f_alpha_divergence_coef",
            "discopop_tau",
            "simpo_gamma",
            "use_weighting",
            "ld_alpha",
            "token_metrics",
        )
        return {name: getattr(self, name) for name in names}

    def data_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fastdpo.train.data.load_preference_data`."""
        return dict(
            max_length=self.max_length, max_prompt_length=self.max_prompt_length, strict=self.strict_data
        )
