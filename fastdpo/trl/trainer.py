"""``fastdpo.trl.DPOTrainer``: TRL 1.16's ``DPOTrainer`` with its fused LM head computed by fastdpo.

TRL's trainer does all its scoring through ``model(..., labels=labels, fused_lm_head=True)``,
the head its constructor adds to the policy (under PEFT, to its base model) and to the
reference model with ``add_fused_lm_head``. Right after, still in the constructor, accelerate
may wrap the reference's forward (mixed-precision autocast), and ``train`` wraps the policy's
(autocast, DistributedDataParallel). fastdpo's head has to sit exactly where TRL's does, inside
those wrappers, so for the constructor's duration TRL's trainer module calls
:func:`fastdpo.trl.lm_head.add_fastdpo_lm_head` instead, which adds TRL's head and fastdpo's
over it. The loss, the metrics, the data handling and everything else stay TRL's own code.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import trl
import trl.trainer.dpo_trainer as trl_dpo_trainer

from fastdpo.trl.lm_head import add_fastdpo_lm_head, log_probs_only


class DPOTrainer(trl.DPOTrainer):
    """TRL 1.16's :class:`trl.DPOTrainer` (same constructor, ``DPOConfig`` and logged metrics)
    whose per-token log-probs and statistics come from fastdpo's fused linear path.

    Switch by changing ``from trl import DPOTrainer`` to ``from fastdpo.trl import DPOTrainer``.
    Models whose logits are not ``hidden @ W.T + b`` (soft-capping, logit scaling, a head that
    is not an ``nn.Linear``), Mixture-of-Experts models with a router loss, and DeepSpeed ZeRO-3
    keep TRL's own head, with one warning that says why.
    """

    @functools.wraps(trl.DPOTrainer.__init__)
    def __init__(self, *args, **kwargs):
        with _fastdpo_heads_while_constructing():
            super().__init__(*args, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        # For `precompute_ref_log_probs`: only the log-probs are read, even when `model` is the
        # policy, whose head would otherwise also compute the statistics for the metrics.
        with log_probs_only():
            return super().compute_ref_log_probs(model, inputs)


_constructing = threading.RLock()  # one fastdpo.trl.DPOTrainer constructor at a time swaps the name


@contextlib.contextmanager
def _fastdpo_heads_while_constructing():
    """TRL's DPOTrainer module adds fastdpo heads while this thread is in the block; any other
    thread constructing a plain ``trl.DPOTrainer`` meanwhile still gets TRL's."""
    with _constructing:
        trl_add = trl_dpo_trainer.add_fused_lm_head
        owner = threading.get_ident()

        @functools.wraps(trl_add)
        def add_fused_lm_head(*args, **kwargs):
            add = add_fastdpo_lm_head if threading.get_ident() == owner else trl_add
            return add(*args, **kwargs)

        trl_dpo_trainer.add_fused_lm_head = add_fused_lm_head
        try:
            yield
        finally:
            trl_dpo_trainer.add_fused_lm_head = trl_add
