"""``DPOTrainer`` and ``DPOConfig``: a thin DPO training loop for any ``transformers`` causal LM.

    trainer = DPOTrainer(model, tokenizer, train_data, config=DPOConfig(...), ref_model=None, eval_data=None)
    before = trainer.evaluate(); trainer.train(); after = trainer.evaluate(); trainer.save(path)

One optimizer step: the global batch (``per_device_train_batch_size x world size x
gradient_accumulation_steps`` pairs, in an order fixed by the seed and the epoch) is split over
the ranks and then into micro-batches; each micro-batch goes through the model as one
``[chosen; rejected]`` forward (:class:`fastdpo.lm.PolicyLoss`), and its loss is weighted by its
share of the global batch, so the gradient is the mean over the pairs of the step however they
are split. Then clipping, AdamW, the learning-rate schedule, one metrics line (TRL's names) and,
every ``save_steps``, an atomic checkpoint. Option names follow TRL's ``DPOConfig``. (Losses that
look across the batch, ``aot`` / ``aot_unpaired`` and the ``sft`` mean, see one micro-batch at a
time, as in TRL with gradient accumulation.)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pathlib
import random
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fastdpo import checkpoint as ckpt
from fastdpo import run_config  # issue 13 (trust): what a resume must match
from fastdpo.data import PreferenceData, collate, load_preference_data
from fastdpo.lm import PolicyLoss, fused_linear_reason, make_loss, model_sequence_logps
from fastdpo.run_dir import RunDir, writes_output_dir  # issue 13 (trust): output-dir ownership + lock

STEP_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)  # fmt: skip
EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/accuracies")


@dataclass
class DPOConfig:
    """Training options. Names and defaults follow TRL's ``DPOConfig`` where it has the option."""

    output_dir: str = "runs/fastdpo"
    # loss (see fastdpo.DPOLoss)
    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    # reference: a frozen copy of the model (default), log-probs precomputed once, or none
    precompute_ref_log_probs: bool = False
    reference_free: bool = False
    # data
    max_length: int = 1024
    max_prompt_length: int | None = 512  # prompts keep their last tokens
    strict_data: bool = False  # bad records raise instead of being skipped and counted
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # linear | cosine | constant (after warm-up)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8  # pairs
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    bf16: bool | None = None  # None: autocast to bfloat16 only on a CUDA device that supports it
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    seed: int = 42
    # fastdpo
    fused_linear: bool | None = None  # None: use FusedLinearDPOLoss when the model allows it
    backend: str = "auto"
    device: str | None = None  # None: cuda (the local rank's under torchrun) if available, else cpu
    # logging and checkpoints
    metrics_file: str = "metrics.jsonl"  # inside output_dir: a line per step and evaluation ("" for none)
    eval_steps: int = 0  # evaluate() every N steps during train() (0: never)
    save_steps: int = 0  # checkpoint every N steps (0: only at the end)
    save_total_limit: int | None = None
    overwrite_output_dir: bool = False  # write next to files fastdpo did not write (it never deletes them)
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.lr_scheduler_type not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"lr_scheduler_type must be linear, cosine or constant, got {self.lr_scheduler_type!r}"
            )
        if self.precompute_ref_log_probs and self.reference_free:
            raise ValueError("precompute_ref_log_probs and reference_free are exclusive: pick one reference")
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


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (TRL does the same): DPO compares two forwards of the same weights."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def lr_lambda(warmup: int, total: int, kind: str):
    """Multiplier of the learning rate at a step: linear warm-up, then linear/cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return (
            max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        )

    return factor


@dataclass
class _Split:
    """One tokenised dataset and its precomputed reference log-probs ``[N, 2]`` (chosen, rejected)."""

    data: PreferenceData
    ref_logps: torch.Tensor | None = None


class DPOTrainer:
    """DPO training of a ``transformers`` causal LM on preference pairs (see the module docstring).

    ``train_data`` / ``eval_data``: a JSONL path, an iterable of ``{"prompt", "chosen", "rejected"}``
    dicts (strings or chat messages), or a :class:`fastdpo.data.PreferenceData`. The reference is
    ``ref_model`` when given, else a frozen copy of ``model``; with ``precompute_ref_log_probs``
    its log-probs are computed in one pass before training and no reference model is kept; with
    ``reference_free`` there is none. Under ``torchrun`` the model is wrapped in
    DistributedDataParallel and only rank 0 writes files.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        train_data,
        config: DPOConfig | None = None,
        ref_model: nn.Module | None = None,
        eval_data=None,
    ) -> None:
        self.config = c = config or DPOConfig()
        self.rank, self.world = _distributed()
        self.device = torch.device(c.device or self._default_device())
        self.bf16 = (
            c.bf16 if c.bf16 is not None else self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        options = dict(max_length=c.max_length, max_prompt_length=c.max_prompt_length, strict=c.strict_data)
        self.splits = {"train": _Split(load_preference_data(train_data, tokenizer, **options))}
        if eval_data is not None:
            self.splits["eval"] = _Split(load_preference_data(eval_data, tokenizer, **options))
        for name, split in self.splits.items():
            if split.data.skipped:
                warnings.warn(f"fastdpo: {name} data: {split.data.summary()}", stacklevel=2)

        self.model = model.to(self.device)
        if c.disable_dropout:
            disable_dropout(self.model)
        if c.gradient_checkpointing:
            self.model.config.use_cache = False
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        reason = fused_linear_reason(self.model)
        if c.fused_linear and reason:
            raise ValueError(f"fused_linear=True but the fused linear path cannot run this model: {reason}")
        self.fused = reason is None and c.fused_linear is not False
        self.fused_reason = reason or (None if self.fused else "fused_linear=False")

        # Reference: a model (given or a frozen copy) or precomputed log-probs or nothing.
        if c.reference_free and ref_model is not None:
            raise ValueError("reference_free=True and a ref_model were both given: pick one reference")
        self.ref_model = None
        if not c.reference_free:
            if ref_model is not None:
                self.ref_model = ref_model.to(self.device)
            elif not c.precompute_ref_log_probs:
                self.ref_model = copy.deepcopy(self.model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.ref_fused = self.fused
        if ref_model is not None and self.ref_model is not None:
            self.ref_fused = c.fused_linear is not False and fused_linear_reason(self.ref_model) is None
        self.policy_is_initial = True  # until the first optimizer step or a resume

        loss_options = dict(beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                            reference_free=c.reference_free, average_log_prob=c.average_log_prob,
                            backend=c.backend, loss_weights=c.loss_weights)  # fmt: skip
        self.policy = PolicyLoss(self.model, make_loss(self.fused, **loss_options), self.fused)
        self.ddp = None
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.policy, device_ids=device_ids)

        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
        )  # fmt: skip
        self.global_batch = c.per_device_train_batch_size * self.world * c.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(self.splits["train"].data) / self.global_batch)
        if c.max_steps > 0:
            self.total_steps = c.max_steps
        else:
            self.total_steps = max(1, math.ceil(c.num_train_epochs * self.steps_per_epoch))
        warmup = c.warmup_steps if c.warmup_steps > 0 else math.ceil(c.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, self.total_steps, c.lr_scheduler_type)
        )
        self.step = 0
        self.evaluations: list[dict] = []  # every evaluate() result, with its step
        self.saved_step: int | None = None
        self.output_dir = pathlib.Path(c.output_dir)
        # issue 13 (trust): the output dir is locked and checked when written; the run's record for resumes
        self.run_dir = RunDir(self.output_dir, c.metrics_file, c.overwrite_output_dir, enabled=self.is_main)
        self.run_record = run_config.describe(self, ref_model)

    # ----------------------------------------------------------------------------- helpers
    def _default_device(self) -> str:
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self.world > 1 else "cuda"
        return "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _batch(self, split: _Split, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([split.data.pairs[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def _step_indices(self, step: int) -> list[int]:
        """Indices of the pairs of optimizer step ``step`` (same on every rank)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            len(self.splits["train"].data), generator=torch.Generator().manual_seed(self.config.seed + epoch)
        )
        return order[position * self.global_batch : (position + 1) * self.global_batch].tolist()

    # ----------------------------------------------------------------------------- reference
    def _reference_logps(self, split: _Split, indices: list[int], batch: dict) -> torch.Tensor | None:
        """``[2B]`` reference log-probs of a batch (None when reference-free)."""
        if self.config.reference_free:
            return None
        if split.ref_logps is not None:
            table = split.ref_logps[indices]
            return torch.cat([table[:, 0], table[:, 1]]).to(self.device)
        model = self.ref_model
        if model is None and self.policy_is_initial:
            model = self.model  # before the first step the policy is the reference
        if model is None:
            raise ValueError(
                "no reference for this data: precompute_ref_log_probs=True without a ref_model can only score "
                "the datasets given to the trainer once training has changed the model"
            )
        with self._autocast():
            return self._sequence_logps(model, batch)

    def _sequence_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        fused = self.ref_fused if model is self.ref_model else self.fused
        return model_sequence_logps(
            model, batch, fused=fused, average=self.config.average_log_prob, backend=self.config.backend
        )

    def precompute_reference(self) -> None:
        """Reference log-probs of every pair of every split, in one pass; then drop the reference model."""
        if not self.config.precompute_ref_log_probs or all(
            s.ref_logps is not None for s in self.splits.values()
        ):
            return
        model = self.ref_model or self.model
        if model is self.model and not self.policy_is_initial:
            raise RuntimeError("cannot precompute reference log-probs from a policy that was already trained")
        was_training = model.training
        model.eval()
        for split in self.splits.values():
            n = len(split.data)
            table = torch.zeros(n, 2)
            mine = list(range(self.rank, n, self.world))
            size = self.config.per_device_eval_batch_size
            for start in range(0, len(mine), size):
                indices = mine[start : start + size]
                with self._autocast():
                    logps = self._sequence_logps(model, self._batch(split, indices)).float().cpu()
                table[indices] = torch.stack(logps.chunk(2), dim=1)
            split.ref_logps = self._all_reduce(table)
        model.train(was_training)
        self.ref_model = None  # nothing but the [N, 2] tables is kept

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data=None, name: str = "custom") -> dict[str, dict[str, float]]:
        """Preference accuracy and loss of the current policy, per split (``train``, ``eval``, or ``data``).

        ``rewards/accuracies``: fraction of pairs whose implicit reward ``beta * (pi - ref)`` ranks
        chosen above rejected (TRL's metric; 0 before training, when policy and reference agree and
        every pair is a tie). ``logps/accuracies``: fraction whose completion log-prob under the
        policy ranks chosen above rejected (meaningful before training too). Also ``loss``,
        ``rewards/margins`` and ``pairs``. The result is appended to ``self.evaluations``.
        """
        splits = dict(self.splits)
        if data is not None:
            c = self.config
            options = dict(
                max_length=c.max_length, max_prompt_length=c.max_prompt_length, strict=c.strict_data
            )
            splits = {name: _Split(load_preference_data(data, self.tokenizer, **options))}
        self.precompute_reference()
        was_training = self.model.training
        self.model.eval()
        results = {}
        for split_name, split in splits.items():
            n = len(split.data)
            sums = torch.zeros(len(EVAL_METRICS) + 1, dtype=torch.float64)
            mine = list(range(self.rank, n, self.world))
            size = self.config.per_device_eval_batch_size
            for start in range(0, len(mine), size):
                indices = mine[start : start + size]
                batch = self._batch(split, indices)
                ref = self._reference_logps(split, indices, batch)
                with self._autocast():
                    out = self.policy(batch["input_ids"], batch["attention_mask"], batch["labels"], ref)
                k = len(indices)
                sums += torch.tensor([
                    out.loss.item() * k,
                    (out.chosen_rewards > out.rejected_rewards).sum().item(),
                    (out.chosen_rewards - out.rejected_rewards).sum().item(),
                    (out.policy_chosen_logps > out.policy_rejected_logps).sum().item(),
                    k,
                ], dtype=torch.float64)  # fmt: skip
            sums = self._all_reduce(sums)
            results[split_name] = {m: (sums[i] / sums[-1]).item() for i, m in enumerate(EVAL_METRICS)}
            results[split_name]["pairs"] = int(sums[-1].item())
        self.model.train(was_training)
        self.evaluations.append({"step": self.step, **results})
        if self.is_main:
            self._append_metrics(
                {"step": self.step, **{f"{s}_{m}": v for s, r in results.items() for m, v in r.items()}}
            )
        return results

    # ----------------------------------------------------------------------------- training
    @writes_output_dir  # issue 13 (trust): holds the output-dir lock for the whole run
    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> list[dict]:
        """Run until ``total_steps``; returns the per-step metrics of this call.

        ``resume_from_checkpoint``: True for the last checkpoint in ``output_dir``, or a checkpoint
        directory. The run then continues exactly where that checkpoint left off.
        """
        c = self.config
        # issue 13 (trust): removes stale temporaries; a new run removes only what earlier fastdpo runs wrote
        self.run_dir.start_run(resume=bool(resume_from_checkpoint))
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        else:
            self._seed()
        self.precompute_reference()
        self.model.train()
        history = []
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="dpo",
            disable=not (self.is_main and c.progress_bar),
        )
        while self.step < self.total_steps:
            metrics = self.training_step(self._step_indices(self.step))
            history.append(metrics)
            if self.is_main:
                self._append_metrics(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
            if c.eval_steps and self.step % c.eval_steps == 0 and self.step < self.total_steps:
                self.evaluate()
            if c.save_steps and self.step % c.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if self.saved_step != self.step:
            self.save_checkpoint()
        return history

    def _seed(self) -> None:
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

    def training_step(self, indices: list[int]) -> dict[str, float]:
        """One optimizer step on the pairs ``indices`` (the global batch, same list on every rank)."""
        c, split = self.config, self.splits["train"]
        mine = indices[self.rank :: self.world]
        micro = [
            mine[i : i + c.per_device_train_batch_size]
            for i in range(0, len(mine), c.per_device_train_batch_size)
        ]
        # A rank with no pair in this (last, short) step still joins the gradient all-reduce, with weight 0.
        weights = [len(m) for m in micro] or [0]
        micro = micro or [indices[:1]]
        module = self.ddp or self.policy
        sums = torch.zeros(len(STEP_METRICS) + 1, dtype=torch.float64)
        for k, (pairs, weight) in enumerate(zip(micro, weights)):
            batch = self._batch(split, pairs)
            ref = self._reference_logps(split, pairs, batch)
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], ref)
                # DDP averages gradients over ranks: scale so the result is the mean over all pairs.
                (out.loss * (self.world * weight / len(indices))).backward()
            if weight:
                metrics = out.metrics()
                sums += torch.tensor(
                    [out.loss.item() * weight] + [metrics[m] * weight for m in STEP_METRICS[1:]] + [weight],
                    dtype=torch.float64,
                )
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        )
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.policy_is_initial = False
        sums = self._all_reduce(sums)
        metrics = {m: (sums[i] / sums[-1]).item() for i, m in enumerate(STEP_METRICS)}
        metrics.update(learning_rate=learning_rate, grad_norm=grad_norm.item(), step=self.step,
                       epoch=round(self.step / self.steps_per_epoch, 4))  # fmt: skip
        return metrics

    def _append_metrics(self, record: dict) -> None:
        self.run_dir.append_metrics(record)  # issue 13 (trust): locked, and the file is marked as fastdpo's

    # ----------------------------------------------------------------------------- saving
    @writes_output_dir  # issue 13 (trust)
    def save(self, path: str | os.PathLike | None = None) -> pathlib.Path | None:
        """Write the model and tokenizer with ``save_pretrained`` (atomically); rank 0 only."""
        path = pathlib.Path(path or self.output_dir / "final")
        if self.is_main:
            ckpt.write_atomically(path, self._save_pretrained)
        self._barrier()
        return path

    def _save_pretrained(self, directory: pathlib.Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @writes_output_dir  # issue 13 (trust)
    def save_checkpoint(self) -> pathlib.Path:
        """``output_dir/checkpoint-<step>``: model, tokenizer and the whole trainer state, atomically."""
        path = self.output_dir / f"checkpoint-{self.step}"
        if self.is_main:
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "world_size": self.world,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "ref_logps": {name: s.ref_logps for name, s in self.splits.items()},
                "evaluations": self.evaluations,
                "config": asdict(self.config),
                "run": self.run_record,  # issue 13 (trust): written to run_config.json, checked on resume
            }

            def write(directory: pathlib.Path) -> None:
                self._save_pretrained(directory)
                ckpt.save_state(directory, state)

            ckpt.write_atomically(path, write)
            ckpt.prune_checkpoints(self.output_dir, self.config.save_total_limit)
        self.saved_step = self.step
        self._barrier()
        return path

    def load_checkpoint(self, path: bool | str | os.PathLike) -> None:
        """Restore model weights, optimizer, scheduler, step, RNG and reference log-probs."""
        # issue 13 (trust): verified against its manifest (falling back past broken ones), said, and
        # refused if this run's options would change the run it continues
        path, state = ckpt.open_checkpoint(self.output_dir if path is True else path, latest=path is True)
        run_config.check_resume(path, state, self.run_record, self.total_steps)
        ckpt.load_model_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.saved_step = state["step"]
        self.evaluations = state["evaluations"]
        self.policy_is_initial = self.step == 0
        for name, table in state["ref_logps"].items():
            if name in self.splits and table is not None:
                self.splits[name].ref_logps = table
        if self.config.precompute_ref_log_probs and self.splits["train"].ref_logps is None:
            raise ValueError(f"checkpoint {path} has no precomputed reference log-probs for this run")
        if self.config.precompute_ref_log_probs:
            self.ref_model = None
        ckpt.set_rng_state(state["rng"])
        # Drop metric lines written after this checkpoint by the interrupted run (issue 13: and a torn one).
        if self.is_main and self.config.metrics_file:
            ckpt.truncate_metrics(self.output_dir / self.config.metrics_file, self.step)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
