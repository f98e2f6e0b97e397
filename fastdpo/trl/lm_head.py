"""TRL 1.16's fused LM head, computed by fastdpo.

TRL's ``DPOTrainer`` gets every log-probability and statistic it uses from one call,
``model(..., labels=labels, fused_lm_head=True)``, which ``trl.trainer.utils.add_fused_lm_head``
installs as ``model.forward`` and which returns a ``FusedCausalLMOutput``. :func:`add_fastdpo_lm_head`
adds TRL's head and wraps it: fused calls run the backbone, then fastdpo's fused linear path on the last
hidden states and the head (only counted positions projected, float32 statistics, the native
kernel on CPU, Triton on CUDA, the statistics TRL reads from the same pass); every other call, and every model the fused path cannot
reproduce (:func:`fallback_reason`), goes to TRL's forward unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
import warnings

import torch
import transformers
from packaging.version import Version
from torch import nn
from torch.distributed.tensor import DTensor
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

from fastdpo import fused_linear_logps

IGNORE_INDEX = -100  # TRL's label for positions that are not scored
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# True inside a reference pass (``compute_ref_log_probs``), which reads the log-probs only.
_LOG_PROBS_ONLY = contextvars.ContextVar("fastdpo_trl_log_probs_only", default=False)


@contextlib.contextmanager
def log_probs_only():
    """Within this block fastdpo heads compute ``log_probs`` and no statistics."""
    token = _LOG_PROBS_ONLY.set(True)
    try:
        yield
    finally:
        _LOG_PROBS_ONLY.reset(token)


def trl_logit_scale(text_config) -> float:
    """The factor TRL's fused head multiplies the logits by, looked up exactly as TRL 1.16 does."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else scale


def fallback_reason(model: nn.Module, kwargs: dict, temperature: float = 1.0) -> str | None:
    """``None`` when fastdpo's fused linear path gives what TRL's fused head gives for this call,
    else why not. Checked on every call: FSDP and PEFT replace modules after the head is added."""
    if temperature != 1.0:
        return f"TRL's head divides the logits by temperature={temperature}"
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap is not None:
        return f"the model soft-caps its logits (final_logit_softcapping={softcap})"
    scale = trl_logit_scale(text_config)
    if scale != 1.0:
        return f"the model scales its logits by {scale}"
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"the LM head is a {type(head).__name__}, not an nn.Linear"
    if head.weight.dtype not in FLOAT_DTYPES or head.weight.dim() != 2:
        return f"the LM head's weight is {head.weight.dtype} {tuple(head.weight.shape)}, not a float matrix"
    if kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False):
        return "the model is a Mixture-of-Experts whose router auxiliary loss TRL's head adds"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions the LM head, which the fused linear path reads whole"
    return None


def add_fastdpo_lm_head(
    model: nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """``trl.trainer.utils.add_fused_lm_head`` (same arguments), computed by fastdpo.

    Adds TRL's fused head, then wraps it: ``model(..., labels=..., fused_lm_head=True)`` runs
    :func:`fastdpo_fused_forward`, filling the ``outputs`` TRL asked for; calls without
    ``fused_lm_head``, and calls :func:`fallback_reason` refuses, go to TRL's forward.
    """
    add_fused_lm_head(
        model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs
    )
    trl_forward = model.forward
    statistics = tuple(name for name in outputs if name != "log_probs")
    warned = []

    # Keep the model's own signature, as TRL does: ``generate`` checks its kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, **kwargs)
        reason = fallback_reason(self, kwargs, temperature)
        if reason is None:
            wanted = () if _LOG_PROBS_ONLY.get() else statistics
            return fastdpo_fused_forward(
                self, *args, statistics=wanted, fp32_head=cast_lm_head_to_fp32, **kwargs
            )
        if not warned:
            warned.append(reason)
            warnings.warn(
                f"fastdpo.trl: {reason}, which fastdpo's fused linear path does not reproduce; "
                f"{type(self).__name__} uses TRL's own fused LM head",
                stacklevel=2,
            )
        return trl_forward(*args, fused_lm_head=True, **kwargs)

    model.forward = types.MethodType(forward, model)


def _backbone(model: nn.Module) -> nn.Module:
    # As TRL 1.16: before transformers 5, vision-language models keep their language backbone in `model`.
    vlm = model.config.get_text_config() is not model.config
    if vlm and Version(transformers.__version__) < Version("5.0.0"):
        return model.model
    return model.base_model


def fastdpo_fused_forward(
    model: nn.Module,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch=None,
    statistics: tuple[str, ...] = (),
    fp32_head: bool = False,
    **kwargs,
) -> FusedCausalLMOutput:
    """What TRL's fused head returns, from the backbone's last hidden states and fastdpo.

    ``labels`` ``[N, T]`` are scored shifted (the hidden state at ``t`` predicts ``labels[:, t+1]``);
    pre-shifted ``shift_labels`` (context/sequence parallelism) are scored as they are. Every
    per-token output is ``[N, T-1]`` (``[N, T]`` for ``shift_labels``), zero where the label is
    -100; ``log_probs`` has a gradient, the statistics do not. ``fp32_head``: the head's
    operands in float32 whatever the autocast dtype (TRL's ``cast_lm_head_to_fp32``).
    """
    kwargs["use_cache"] = False
    hidden = _backbone(model)(*args, **kwargs).last_hidden_state
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it, as TRL does
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    # The backbone can end on another device than the head (``device_map``).
    hidden = hidden.to(weight.device)
    shift = shift_labels is None
    labels = (labels if shift else shift_labels).to(weight.device)
    # The head's matmul runs in the autocast dtype when autocast is on (as nn.Linear and TRL's
    # tiles would), else in the head's dtype; fastdpo then keeps products and statistics in float32.
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    dtype = torch.float32 if fp32_head else dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)

    out = fused_linear_logps(
        hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, shift=shift, statistics=bool(statistics)
    )
    log_probs = out.token_logps
    targets = labels[:, 1:] if shift else labels  # the next token of each scored position
    label_mask = targets != IGNORE_INDEX
    # TokenStatistics has TRL's field names; only the ones TRL reads are handed over.
    per_token = {name: getattr(out.statistics, name) for name in statistics}
    count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count, log_probs=log_probs, label_mask=label_mask, **per_token
    )
