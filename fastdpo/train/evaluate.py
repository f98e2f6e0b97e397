"""Preference accuracy and loss of a policy on pairs: ``DPOTrainer.evaluate`` and ``fastdpo eval``."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastdpo.train.data import PreferenceData, collate
from fastdpo.train.dist import Runtime
from fastdpo.train.lm import PolicyLoss
from fastdpo.train.reference import Reference

EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/accuracies")


def batches(
    data: PreferenceData, runtime: Runtime, batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """This rank's share of ``data`` in batches: ``(indices, collated batch on the device)``."""
    mine = runtime.shard(len(data))
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        batch = collate([data.pairs[i] for i in indices], pad_id)
        yield indices, {k: v.to(runtime.device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_pairs(
    policy: PolicyLoss,
    reference: Reference,
    data: PreferenceData,
    runtime: Runtime,
    *,
    batch_size: int,
    pad_id: int,
    table: str | None = None,
) -> dict[str, float]:
    """``loss``, ``rewards/accuracies``, ``rewards/margins``, ``logps/accuracies`` and ``pairs`` over ``data``.

    ``rewards/accuracies``: fraction of pairs whose implicit reward ``beta * (pi - ref)`` ranks
    chosen above rejected (TRL's metric; 0 before training, when policy and reference agree and
    every pair is a tie). ``logps/accuracies``: fraction whose completion log-prob under the policy
    ranks chosen above rejected (meaningful before training too). Each rank scores its share and the
    sums are reduced over the ranks. ``table``: the name of the dataset whose precomputed reference
    log-probs apply (see :class:`fastdpo.train.reference.Precomputed`); None for other data.
    """
    was_training = policy.model.training
    policy.model.eval()
    sums = torch.zeros(len(EVAL_METRICS) + 1, dtype=torch.float64)
    try:
        for indices, batch in batches(data, runtime, batch_size, pad_id):
            ref = reference.logps(batch, indices, table)
            with runtime.autocast():
                out = policy(batch["input_ids"], batch["attention_mask"], batch["labels"], ref)
            k = len(indices)
            margins = out.chosen_rewards - out.rejected_rewards
            sums += torch.tensor(
                [
                    out.loss.item() * k,
                    (out.chosen_rewards > out.rejected_rewards).sum().item(),
                    margins.sum().item(),
                    (out.policy_chosen_logps > out.policy_rejected_logps).sum().item(),
                    k,
                ],
                dtype=torch.float64,
            )
    finally:
        policy.model.train(was_training)
    sums = runtime.all_reduce(sums)
    result = {metric: (sums[i] / sums[-1]).item() for i, metric in enumerate(EVAL_METRICS)}
    result["pairs"] = int(sums[-1].item())
    return result
