"""What a resumed run must share with the run it continues.

Each checkpoint's ``run_config.json`` records the run: every ``DPOConfig`` option, the effective
bf16 autocast and step count, the number of processes, a digest of the tokenised training and
evaluation pairs, and a fingerprint of the model the run started from (and of the reference model
when one was given). A resume compares its own record with it and refuses every difference that
would change the steps already taken, listing them all in one error. ``RESUME_RULES`` says, for each
option, which kind it is; a test checks that every ``DPOConfig`` field is in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import asdict, replace

import torch

CHANGES = "changes the run"  # a different value would change the steps already taken: refused
EXTENDS = "extends the run"  # more steps: allowed, but not fewer than the checkpoint has taken
FREE = "free"  # the same computation done another way, or output and observation: allowed

RESUME_RULES: dict[str, str] = {
    # the loss
    "beta": CHANGES,
    "loss_type": CHANGES,
    "loss_weights": CHANGES,
    "label_smoothing": CHANGES,
    "average_log_prob": CHANGES,
    "f_divergence_type": CHANGES,
    "f_alpha_divergence_coef": CHANGES,
    "discopop_tau": CHANGES,
    "simpo_gamma": CHANGES,
    "use_weighting": CHANGES,
    "ld_alpha": CHANGES,
    # the reference (with precomputed log-probs, the checkpoint's table is the reference)
    "precompute_ref_log_probs": CHANGES,
    "reference_free": CHANGES,
    # which pairs, and how they are tokenised (max_prompt_length by its value: "auto" is resolved)
    "max_length": CHANGES,
    "max_prompt_length": CHANGES,
    "strict_data": CHANGES,
    # the optimisation and the data order
    "learning_rate": CHANGES,
    "weight_decay": CHANGES,
    "adam_beta1": CHANGES,
    "adam_beta2": CHANGES,
    "adam_epsilon": CHANGES,
    "lr_scheduler_type": CHANGES,
    "warmup_ratio": CHANGES,
    "warmup_steps": CHANGES,
    "per_device_train_batch_size": CHANGES,
    "gradient_accumulation_steps": CHANGES,
    "max_grad_norm": CHANGES,
    "bf16": CHANGES,
    "disable_dropout": CHANGES,
    "seed": CHANGES,
    # the length: a longer run recomputes the learning-rate schedule from the checkpoint's step on
    "num_train_epochs": EXTENDS,
    "max_steps": EXTENDS,
    # the same computation another way
    "fused_linear": FREE,
    "backend": FREE,
    "device": FREE,
    "gradient_checkpointing": FREE,
    # output and observation
    "output_dir": FREE,
    "overwrite_output_dir": FREE,
    "metrics_file": FREE,
    "eval_steps": FREE,
    "per_device_eval_batch_size": FREE,
    "save_steps": FREE,
    "save_total_limit": FREE,
    "progress_bar": FREE,
    "token_metrics": FREE,
}
# Beyond the options, a resume must match these facts of the run (all CHANGES).
RUN_FACTS = {
    "autocast_bf16": "bf16 autocast as applied (bf16=None resolves by device)",
    "world_size": "processes (the global batch is per-device batch x processes x accumulation)",
    "train_data": "digest of the tokenised training pairs (file contents, tokenizer, lengths)",
    "eval_data": "digest of the tokenised evaluation pairs (the checkpoint holds their evaluations)",
    "model": "fingerprint of the model the run started from (with --reference copy, the reference)",
    "ref_model": "fingerprint of the reference model given (--ref-model)",
}
SAMPLE = 4096  # elements of each tensor in a model fingerprint


class ResumeRefused(ValueError):
    """A resume whose options or data would change the run it continues; the message lists them."""


def data_digest(data) -> str | None:
    """sha256 of the token ids of every pair of a ``PreferenceData`` (None for no data)."""
    if data is None:
        return None
    digest = hashlib.sha256()
    for pair in data.pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(8, "little") + array("q", ids).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module | None) -> dict | None:
    """Element count of the state dict, dtypes, and a sha256 of every tensor's name, shape and an
    evenly spaced sample of its bytes: cheap on any model, the same wherever the same weights load."""
    if model is None:
        return None
    digest, count, dtypes = hashlib.sha256(), 0, set()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
        count += tensor.numel()
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
    return {"state_dict_elements": count, "dtypes": sorted(dtypes), "sample_sha256": digest.hexdigest()}


def options(config) -> dict:
    """Every ``DPOConfig`` option by the value the run uses: rebuilt through ``__post_init__``, so a
    ``max_prompt_length`` of ``"auto"`` is its resolved length (``auto`` and the length it resolves
    to are the same run)."""
    return asdict(replace(config))


def describe(trainer) -> dict:
    """The record of ``trainer``'s run (call it before training changes the model); the reference
    says what of it a resume must match (:meth:`fastdpo.train.reference.Reference.fingerprint`)."""
    record = {
        "format": "fastdpo-run-config-1",
        "config": options(trainer.config),
        "total_steps": trainer.total_steps,
        "autocast_bf16": bool(trainer.bf16),
        "world_size": trainer.world,
        "train_data": data_digest(trainer.splits["train"]),
        "eval_data": data_digest(trainer.splits["eval"]) if "eval" in trainer.splits else None,
        "model": model_fingerprint(trainer.model),
        "ref_model": trainer.reference.fingerprint(),
    }
    return json.loads(json.dumps(record))  # as it will read back: lists, not tuples


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64:  # a digest
        return value[:12]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _same_losses(config: dict) -> dict:
    """``config`` with the loss list spelled one way: ``"sigmoid"`` is ``["sigmoid"]``, and
    ``loss_weights=None`` is a weight of 1 for each loss type (the same loss either way)."""
    types = config.get("loss_type")
    if isinstance(types, str):
        types = [types]
    weights = config.get("loss_weights")
    if weights is None and isinstance(types, list):
        weights = [1.0] * len(types)
    elif isinstance(weights, list):
        weights = [float(w) for w in weights]
    return {**config, "loss_type": types, "loss_weights": weights}


def differences(saved: dict, current: dict) -> list[str]:
    """``"name: old -> new"`` for each option or fact that may not change on resume."""
    found = []
    before, now = _same_losses(saved["config"]), _same_losses(current["config"])
    for name, kind in RESUME_RULES.items():
        old, new = before.get(name, now[name]), now[name]
        if kind == CHANGES and old != new:
            found.append(f"{name} {_short(old)} -> {_short(new)}")
    for name in RUN_FACTS:
        if saved.get(name) != current[name]:
            found.append(f"{name} {_short(saved.get(name))} -> {_short(current[name])}")
    return found


def check_resume(checkpoint: str | os.PathLike, state: dict, current: dict, total_steps: int) -> None:
    """Refuse (:class:`ResumeRefused`) a resume from ``checkpoint`` that would change its run."""
    saved = state.get("run")
    if not isinstance(saved, dict) or "config" not in saved:
        raise ResumeRefused(f"{checkpoint}: no run configuration to check a resume against (older fastdpo?)")
    found = differences(saved, current)
    if total_steps < state["step"]:
        steps = f"this run ends at step {total_steps}, the checkpoint is at step {state['step']}"
        found.append(f"max_steps/num_train_epochs: {steps}")
    if found:
        raise ResumeRefused(
            f"cannot resume from {checkpoint}: {'; '.join(found)}. These would change the run so far; "
            "restore them, or start a new run without resuming"
        )
