"""The metrics of one optimizer step: summed on the device over its micro-batches, read once.

Each micro-batch's :class:`fastdpo.DPOOutput` adds its metric tensors, weighted by its pairs, to
one running tensor on the device; nothing leaves the device until the step ends, when the sums
are reduced over the ranks and turned into floats (one transfer per optimizer step, not one per
micro-batch). With ``token_metrics`` the token sums (entropy, top-1 hits and the tokens they are
over) are added as they are, so ``entropy`` and ``mean_token_accuracy`` are means over every
token of the step, however the step is split.

``num_tokens`` is TRL's: the prompt and completion tokens (the attention mask) of both rows of
every pair trained on so far, counted from the data, so a resumed run continues the count.
"""

from __future__ import annotations

import torch

from fastdpo.modules import DPOOutput, token_means

STEP_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
TOKEN_SUMS = ("entropy_sum", "tokens", "top1_chosen", "chosen_tokens")


class StepSums:
    """Running sums of one step: ``add`` each micro-batch, then ``reduce`` once."""

    def __init__(self, token_metrics: bool) -> None:
        self.token_metrics = token_metrics
        self.size = len(STEP_METRICS) + 1 + (len(TOKEN_SUMS) if token_metrics else 0)
        self.total: torch.Tensor | None = None

    def add(self, out: DPOOutput, pairs: int) -> None:
        """The metrics of a micro-batch of ``pairs`` pairs (without a device sync)."""
        tensors = out.metric_tensors()
        loss = out.loss.detach().double()
        row = [loss * pairs] + [tensors[m].double() * pairs for m in STEP_METRICS[1:]]
        row.append(torch.full((), float(pairs), dtype=torch.float64, device=loss.device))
        if self.token_metrics:
            row += [out.token_sums[name].double() for name in TOKEN_SUMS]
        row = torch.stack(row)
        self.total = row if self.total is None else self.total + row

    def reduce(self, runtime) -> dict[str, float]:
        """The step's metrics over every rank: pair-weighted means, and the token means."""
        total = torch.zeros(self.size, dtype=torch.float64) if self.total is None else self.total
        sums = runtime.all_reduce(total)  # on the CPU: the step's one transfer of metrics
        pairs = sums[len(STEP_METRICS)]
        metrics = {m: (sums[i] / pairs).item() for i, m in enumerate(STEP_METRICS)}
        if self.token_metrics:
            tokens = dict(zip(TOKEN_SUMS, sums[len(STEP_METRICS) + 1 :]))
            metrics.update({name: value.item() for name, value in token_means(tokens).items()})
        return metrics


def pair_tokens(data) -> torch.Tensor:
    """``[N]`` int64: the tokens TRL's ``num_tokens`` counts for each pair (the attention mask of
    its chosen and rejected rows: the prompt twice, and both completions)."""
    return torch.tensor(
        [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data.pairs],
        dtype=torch.int64,
    )
