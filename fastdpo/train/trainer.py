"""``DPOTrainer``: a thin DPO training loop for any ``transformers`` causal LM.

    trainer = DPOTrainer(model, tokenizer, train_data, config=DPOConfig(...), ref_model=None, eval_data=None)
    before = trainer.evaluate(); trainer.train(); after = trainer.evaluate(); trainer.save(path)

Set-up, in order (torchtune's recipe shape): ``_setup_data`` (tokenise), ``_setup_model`` (device,
dropout, gradient checkpointing, the loss and its path), ``_setup_reference`` (one object of
:mod:`fastdpo.train.reference`), ``_setup_distributed`` (DDP), ``_setup_optimizer`` (AdamW and the
schedule). One optimizer step: the global batch (``per_device_train_batch_size x world size x
gradient_accumulation_steps`` pairs, in an order fixed by the seed and the epoch) is split over
the ranks and then into micro-batches; each micro-batch goes through the model as one
``[chosen; rejected]`` forward (:class:`fastdpo.train.lm.PolicyLoss`), and its loss is weighted by its
share of the global batch, so the gradient is the mean over the pairs of the step however they
are split. Then clipping, AdamW, the learning-rate schedule, one metrics line (TRL's names) and,
every ``save_steps``, an atomic checkpoint. The step's metrics stay on the device until the
step ends (:mod:`fastdpo.train.step_metrics`: one transfer per optimizer step). Option names
follow TRL's ``DPOConfig``. (Losses that look across the batch, ``aot`` / ``aot_unpaired`` and
the ``sft`` mean, see one micro-batch at a time, as in TRL with gradient accumulation.)
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import random
import warnings
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastdpo.train import checkpoint as ckpt
from fastdpo.train import run_config  # issue 13 (trust): what a resume must match
from fastdpo.train.config import DPOConfig
from fastdpo.train.data import PreferenceData, collate, load_preference_data, pad_token_id
from fastdpo.train.dist import Runtime
from fastdpo.train.evaluate import batches, evaluate_pairs
from fastdpo.train.lm import PolicyLoss
from fastdpo.train.reference import FrozenCopy, NoReference, OtherModel, Precomputed, Reference, Scorer
from fastdpo.train.run_dir import RunDir, writes_output_dir  # issue 13 (trust): output-dir ownership + lock
from fastdpo.train.step_metrics import StepSums, pair_tokens


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


class DPOTrainer:
    """DPO training of a ``transformers`` causal LM on preference pairs (see the module docstring).

    ``train_data`` / ``eval_data``: a JSONL path, an iterable of ``{"prompt", "chosen", "rejected"}``
    dicts (strings or chat messages), or a :class:`fastdpo.train.data.PreferenceData`. The reference is
    ``ref_model`` when given, else a frozen copy of ``model``; with ``precompute_ref_log_probs``
    its log-probs are computed in one pass before training and no reference model is kept; with
    ``reference_free`` there is none (see :mod:`fastdpo.train.reference`). Under ``torchrun`` the
    model is wrapped in DistributedDataParallel and only rank 0 writes files.
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
        self.config = config or DPOConfig()
        self.runtime = Runtime.detect(self.config.device, self.config.bf16)
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        self.output_dir = pathlib.Path(self.config.output_dir)
        self._setup_data(train_data, eval_data)
        self._setup_model(model)
        self._setup_reference(ref_model)
        self._setup_distributed()
        self._setup_optimizer()
        self.step = 0
        self.num_tokens = 0  # TRL's num_tokens: prompt + completion tokens trained on so far
        self.evaluations: list[dict] = []  # every evaluate() result, with its step
        self.saved_step: int | None = None
        # issue 13 (trust): the output dir is locked and checked when written; the run's record for resumes
        self.run_dir = RunDir.for_config(self.config, enabled=self.is_main)
        self.run_record = run_config.describe(self)

    # ----------------------------------------------------------------------------- set-up
    def _setup_data(self, train_data, eval_data) -> None:
        options = self.config.data_options()
        self.splits: dict[str, PreferenceData] = {
            "train": load_preference_data(train_data, self.tokenizer, **options)
        }
        if eval_data is not None:
            self.splits["eval"] = load_preference_data(eval_data, self.tokenizer, **options)
        for name, data in self.splits.items():
            if data.skipped:
                warnings.warn(f"fastdpo: {name} data: {data.summary()}", stacklevel=3)

    def _setup_model(self, model: nn.Module) -> None:
        c = self.config
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
        self.policy = PolicyLoss.build(self.model, c)
        self.fused, self.fused_reason = self.policy.fused, self.policy.fused_reason

    def _setup_reference(self, ref_model: nn.Module | None) -> None:
        c = self.config
        if c.reference_free and ref_model is not None:
            raise ValueError("reference_free=True and a ref_model were both given: pick one reference")
        score = Scorer(self.runtime, average=c.average_log_prob, backend=c.backend, ld_alpha=c.ld_alpha)
        other = None if ref_model is None else OtherModel(ref_model, score, c.fused_linear)
        self.reference: Reference
        if c.reference_free:
            self.reference = NoReference()
        elif c.precompute_ref_log_probs:
            self.reference = Precomputed(self.splits, self.model, self.fused, score, other)
        else:
            self.reference = other or FrozenCopy(self.model, self.fused, score)

    def _setup_distributed(self) -> None:
        self.ddp = None
        if self.world > 1:  # after the reference: a frozen copy is taken of the bare model
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.policy, device_ids=device_ids)

    def _setup_optimizer(self) -> None:
        c = self.config
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
        )
        self.global_batch = c.per_device_train_batch_size * self.world * c.gradient_accumulation_steps
        self.pair_tokens = pair_tokens(self.splits["train"])
        self.steps_per_epoch = math.ceil(len(self.splits["train"]) / self.global_batch)
        if c.max_steps > 0:
            self.total_steps = c.max_steps
        else:
            self.total_steps = max(1, math.ceil(c.num_train_epochs * self.steps_per_epoch))
        warmup = c.warmup_steps if c.warmup_steps > 0 else math.ceil(c.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(warmup, self.total_steps, c.lr_scheduler_type)
        )

    # ----------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world(self) -> int:
        return self.runtime.world

    @property
    def bf16(self) -> bool:
        return self.runtime.bf16

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def ref_model(self) -> nn.Module | None:
        """The reference model held in memory (None when precomputed or reference-free)."""
        return self.reference.model

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.splits["train"].pairs[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _batches(self, data: PreferenceData):
        return batches(data, self.runtime, self.config.per_device_eval_batch_size, self.pad_id)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed + epoch)
        return torch.randperm(len(self.splits["train"]), generator=generator)

    def _step_indices(self, step: int) -> list[int]:
        """Indices of the pairs of optimizer step ``step`` (same on every rank)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        return order[position * self.global_batch : (position + 1) * self.global_batch].tolist()

    def _tokens_before(self, step: int) -> int:
        """``num_tokens`` after ``step`` optimizer steps: every epoch holds every pair once."""
        epoch, position = divmod(step, self.steps_per_epoch)
        done = self._epoch_order(epoch)[: position * self.global_batch]
        return epoch * int(self.pair_tokens.sum()) + int(self.pair_tokens[done].sum())

    def precompute_reference(self) -> None:
        """With ``precompute_ref_log_probs``: the reference log-probs of every pair of every dataset,
        in one pass, after which no reference model is kept (otherwise nothing to do)."""
        self.reference.prepare(self._batches)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, data=None, name: str = "custom") -> dict[str, dict[str, float]]:
        """Preference accuracy and loss of the current policy, per split (``train``, ``eval``, or ``data``).

        See :func:`fastdpo.train.evaluate.evaluate_pairs` for the metrics (``loss``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/accuracies``, ``pairs``). The result is
        appended to ``self.evaluations`` and to the metrics file.
        """
        if data is None:
            targets = {split: (pairs, split) for split, pairs in self.splits.items()}
        else:  # no precomputed table applies to data given here
            targets = {name: (load_preference_data(data, self.tokenizer, **self.config.data_options()), None)}
        self.precompute_reference()
        size = self.config.per_device_eval_batch_size
        results = {
            split: evaluate_pairs(
                self.policy,
                self.reference,
                pairs,
                self.runtime,
                batch_size=size,
                pad_id=self.pad_id,
                table=table,
            )
            for split, (pairs, table) in targets.items()
        }
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
        c = self.config
        mine = indices[self.rank :: self.world]
        micro = [
            mine[i : i + c.per_device_train_batch_size]
            for i in range(0, len(mine), c.per_device_train_batch_size)
        ]
        # A rank with no pair in this (last, short) step still joins the gradient all-reduce, with weight 0.
        weights = [len(m) for m in micro] or [0]
        micro = micro or [indices[:1]]
        module = self.ddp or self.policy
        sums = StepSums(c.token_metrics)
        for k, (pairs, weight) in enumerate(zip(micro, weights)):
            batch = self._batch(pairs)
            ref = self.reference.logps(batch, pairs, "train")
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with self.runtime.autocast():
                    out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], ref)
                # DDP averages gradients over ranks: scale so the result is the mean over all pairs.
                (out.loss * (self.world * weight / len(indices))).backward()
            if weight:
                sums.add(out, weight)  # on the device: no sync per micro-batch
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
        )
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.reference.policy_updated()
        metrics = sums.reduce(self.runtime)
        self.num_tokens += int(self.pair_tokens[indices].sum())
        metrics.update(
            num_tokens=self.num_tokens,
            learning_rate=learning_rate,
            grad_norm=grad_norm.item(),
            step=self.step,
            epoch=round(self.step / self.steps_per_epoch, 4),
        )
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
        self.runtime.barrier()
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
                **self.reference.state_dict(),  # its checkpoint entries ("ref_logps")
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
        self.runtime.barrier()
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
        self.num_tokens = self._tokens_before(self.step)
        self.evaluations = state["evaluations"]
        self.reference.load_state_dict(state, where=path)
        if self.step > 0:
            self.reference.policy_updated()
        ckpt.set_rng_state(state["rng"])
        # Drop metric lines written after this checkpoint by the interrupted run (issue 13: and a torn one).
        if self.is_main and self.config.metrics_file:
            ckpt.truncate_metrics(self.output_dir / self.config.metrics_file, self.step)
