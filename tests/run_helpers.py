"""Helpers for the tests of what a run writes and reads back: trainers, killed runs, damaged files."""

from __future__ import annotations

import pathlib

import pytest
from lm_helpers import PAIRS, load

from fastdpo import DPOConfig, DPOTrainer

FAST = dict(learning_rate=1e-2, max_length=64, max_prompt_length=32, progress_bar=False)


def make_trainer(model_dir, out, data=PAIRS, eval_data=None, ref_model=None, **options) -> DPOTrainer:
    model, tokenizer = load(model_dir)
    config = DPOConfig(output_dir=str(out), **{**FAST, **options})
    return DPOTrainer(model, tokenizer, data, config=config, ref_model=ref_model, eval_data=eval_data)


def killed_run(model_dir, out, monkeypatch, at_step: int, **options) -> None:
    """Train into ``out`` and die (KeyboardInterrupt) when step ``at_step + 1`` starts."""
    step = DPOTrainer.training_step

    def killed(self, indices):
        if self.step == at_step:
            raise KeyboardInterrupt("simulated kill")
        return step(self, indices)

    monkeypatch.setattr(DPOTrainer, "training_step", killed)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(model_dir, out, **options).train()
    monkeypatch.undo()


def flip_byte(path: pathlib.Path, offset: int = -100) -> None:
    """Change one byte (by default near the end: tensor data, not a header)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
