"""Where a batch's reference log-probs come from: one small object per rule, owning its state.

- ``FrozenCopy`` (the default): a frozen copy of the policy as it is before training.
- ``OtherModel`` (``ref_model=``): that model, frozen.
- ``Precomputed`` (``precompute_ref_log_probs``): ``[N, 2]`` tables per dataset, computed in one pass
  before training by the other model or by the policy before its first step; no model is kept
  after that, and the tables are its checkpoint entry (``ref_logps``).
- ``NoReference`` (``reference_free``): none.

Each answers ``logps(batch, indices, table)``: the ``[2B]`` reference log-probs of a collated batch
(chosen rows, then rejected), or None for a reference-free loss. ``table`` names the dataset the
rows ``indices`` come from, for a precomputed table; it is None for data given later. Each also
owns its checkpoint entries (``state_dict`` / ``load_state_dict``) and says what a resume must find
unchanged of it (``fingerprint``: the reference model given to the run, see
:mod:`fastdpo.train.run_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fastdpo.train.data import PreferenceData
from fastdpo.train.dist import Runtime
from fastdpo.train.lm import fused_linear_reason, model_sequence_logps
from fastdpo.train.run_config import model_fingerprint

Batches = Callable[[PreferenceData], Iterator[tuple[list[int], dict[str, torch.Tensor]]]]


@dataclass
class Scorer:
    """``[2B]`` float32 completion log-probs of a model on a batch: no autograd, the run's autocast."""

    runtime: Runtime
    average: bool = False  # per-token means instead of sums (average_log_prob)
    backend: str = "auto"
    ld_alpha: float | None = None  # LD-DPO's weighted sums, as the loss takes the policy's

    def __call__(self, model: nn.Module, fused: bool, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.runtime.autocast():
            return model_sequence_logps(
                model, batch, fused=fused, average=self.average, backend=self.backend, ld_alpha=self.ld_alpha
            )


class Reference:
    """The interface; the defaults suit a reference that keeps nothing in checkpoints."""

    model: nn.Module | None = None  # the reference model held in memory, if any

    def logps(self, batch: dict, indices: list[int], table: str | None = None) -> torch.Tensor | None:
        raise NotImplementedError

    def prepare(self, batches: Batches) -> None:
        """Work done once, before the reference is first needed."""

    def policy_updated(self) -> None:
        """The policy took an optimizer step, or was restored to one."""

    def state_dict(self) -> dict:
        return {"ref_logps": {}}

    def load_state_dict(self, state: dict, where: object = "the checkpoint") -> None:
        pass

    def fingerprint(self) -> dict | None:
        """What a resume must find unchanged of a reference model given to the run (its
        :func:`~fastdpo.train.run_config.model_fingerprint`); None when there is none (a frozen copy
        is the policy's starting point, which the run's record fingerprints already)."""
        return None


class NoReference(Reference):
    """Reference-free losses: there is no reference."""

    def logps(self, batch, indices, table=None) -> None:
        return None


class FrozenModel(Reference):
    """A reference model held in memory, in eval mode and without gradients."""

    def __init__(self, model: nn.Module, fused: bool, score: Scorer) -> None:
        self.model, self.fused, self.score = model.eval().requires_grad_(False), fused, score

    def logps(self, batch, indices, table=None) -> torch.Tensor:
        return self.score(self.model, self.fused, batch)


class FrozenCopy(FrozenModel):
    """The default: a frozen copy of the policy as it is before training (same loss path)."""

    def __init__(self, policy: nn.Module, fused: bool, score: Scorer) -> None:
        super().__init__(copy.deepcopy(policy), fused, score)


class OtherModel(FrozenModel):
    """A different reference model, moved to the run's device; it takes the fused linear path
    whenever that reproduces its logits (unless ``fused_linear`` is False)."""

    def __init__(self, model: nn.Module, score: Scorer, fused_linear: bool | None = None) -> None:
        model = model.to(score.runtime.device)
        super().__init__(model, fused_linear is not False and fused_linear_reason(model) is None, score)

    def fingerprint(self) -> dict | None:
        return model_fingerprint(self.model)


class Precomputed(Reference):
    """Reference log-probs of every pair of ``datasets``, computed once by ``other`` (another model)
    or, when it is None, by the policy before its first optimizer step. The model is dropped once
    the ``[N, 2]`` tables (chosen, rejected) exist; the tables go into checkpoints."""

    def __init__(
        self,
        datasets: dict[str, PreferenceData],
        policy: nn.Module,
        policy_fused: bool,
        score: Scorer,
        other: OtherModel | None = None,
    ) -> None:
        self.datasets, self.policy, self.policy_fused, self.score = datasets, policy, policy_fused, score
        self.other = other
        self.policy_is_reference = other is None  # until the policy's first optimizer step
        self.tables: dict[str, torch.Tensor] = {}

    @property
    def model(self) -> nn.Module | None:
        return None if self.other is None else self.other.model

    def _source(self) -> tuple[nn.Module, bool] | None:
        if self.other is not None:
            return self.other.model, self.other.fused
        if self.policy_is_reference:
            return self.policy, self.policy_fused
        return None

    def prepare(self, batches: Batches) -> None:
        """The tables of the datasets that have none, in one pass split over the ranks; then drop ``other``."""
        missing = [name for name in self.datasets if name not in self.tables]
        if not missing:
            return
        source = self._source()
        if source is None:
            raise RuntimeError("cannot precompute reference log-probs from a policy that was already trained")
        model, fused = source
        was_training = model.training
        model.eval()
        try:
            for name in missing:
                table = torch.zeros(len(self.datasets[name]), 2)
                for indices, batch in batches(self.datasets[name]):
                    logps = self.score(model, fused, batch).float().cpu()
                    table[indices] = torch.stack(logps.chunk(2), dim=1)
                self.tables[name] = self.score.runtime.all_reduce(table)
        finally:
            model.train(was_training)
        self.other = None  # nothing but the tables is kept

    def logps(self, batch, indices, table=None) -> torch.Tensor:
        if table in self.tables:
            rows = self.tables[table][indices]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        source = self._source()
        if source is None:
            raise ValueError(
                "no reference for this data: with precompute_ref_log_probs=True the reference log-probs "
                "exist only for the datasets given to the trainer once the reference model is dropped "
                "(or, without a ref_model, once training has changed the model)"
            )
        return self.score(*source, batch)

    def policy_updated(self) -> None:
        self.policy_is_reference = False

    def fingerprint(self) -> dict | None:  # the model the tables come from, while it is held
        return None if self.other is None else self.other.fingerprint()

    def state_dict(self) -> dict:
        return {"ref_logps": dict(self.tables)}

    def load_state_dict(self, state: dict, where: object = "the checkpoint") -> None:
        tables = state.get("ref_logps") or {}
        tables = {name: t for name, t in tables.items() if name in self.datasets and t is not None}
        if "train" not in tables:
            raise ValueError(f"checkpoint {where} has no precomputed reference log-probs for this run")
        self.tables, self.other = tables, None
