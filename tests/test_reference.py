"""The reference rules as objects: which one a config picks, what each holds, its checkpoint entries."""

import pytest
import torch
from lm_helpers import PAIRS, load

from fastdpo import DPOConfig, DPOTrainer, sequence_logps
from fastdpo.train.data import collate
from fastdpo.train.reference import FrozenCopy, NoReference, OtherModel, Precomputed


def make(model_dir, tmp_path, ref_model=None, **options):
    model, tokenizer = load(model_dir)
    config = DPOConfig(output_dir=str(tmp_path), max_length=64, progress_bar=False, **options)
    return DPOTrainer(model, tokenizer, PAIRS, config=config, ref_model=ref_model, eval_data=PAIRS[:2])


def all_logps(model, trainer):
    batch = collate(trainer.splits["train"].pairs, trainer.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def test_each_rule_is_one_object(gpt2_dir, llama_dir, tmp_path):
    other, _ = load(llama_dir)
    copy = make(gpt2_dir, tmp_path)
    assert isinstance(copy.reference, FrozenCopy) and copy.ref_model is not copy.model
    assert not any(p.requires_grad for p in copy.ref_model.parameters()) and not copy.ref_model.training
    given = make(gpt2_dir, tmp_path, ref_model=other)
    assert isinstance(given.reference, OtherModel) and given.ref_model is other
    free = make(gpt2_dir, tmp_path, reference_free=True)
    assert isinstance(free.reference, NoReference) and free.ref_model is None
    assert free.reference.logps({}, [0]) is None
    pre = make(gpt2_dir, tmp_path, precompute_ref_log_probs=True)
    assert isinstance(pre.reference, Precomputed) and pre.ref_model is None
    with pytest.raises(ValueError, match="reference_free=True and a ref_model"):
        make(gpt2_dir, tmp_path, ref_model=other, reference_free=True)


def test_precomputed_from_another_model_then_dropped(gpt2_dir, llama_dir, tmp_path):
    other, _ = load(llama_dir)
    trainer = make(gpt2_dir, tmp_path, ref_model=other, precompute_ref_log_probs=True)
    assert trainer.ref_model is other  # held until the tables exist
    expected = all_logps(other, trainer)
    trainer.precompute_reference()
    assert trainer.ref_model is None and set(trainer.reference.tables) == {"train", "eval"}
    table = trainer.reference.tables["train"]
    torch.testing.assert_close(torch.cat([table[:, 0], table[:, 1]]), expected, atol=1e-5, rtol=0)
    # The other model is gone and the policy never was the reference: new data has none.
    with pytest.raises(ValueError, match="no reference for this data"):
        trainer.evaluate(PAIRS[:2])


def test_precomputed_checkpoint_entries(gpt2_dir, tmp_path):
    trainer = make(gpt2_dir, tmp_path, precompute_ref_log_probs=True)
    trainer.precompute_reference()
    state = trainer.reference.state_dict()
    assert set(state) == {"ref_logps"} and set(state["ref_logps"]) == {"train", "eval"}
    fresh = make(gpt2_dir, tmp_path / "b", precompute_ref_log_probs=True)
    fresh.reference.load_state_dict({"ref_logps": {**state["ref_logps"], "gone": torch.zeros(1, 2)}})
    assert set(fresh.reference.tables) == {"train", "eval"}  # only this run's datasets
    torch.testing.assert_close(fresh.reference.tables["train"], trainer.reference.tables["train"])
    with pytest.raises(ValueError, match="checkpoint somewhere has no precomputed reference log-probs"):
        fresh.reference.load_state_dict({"ref_logps": {"train": None}}, where="somewhere")
    assert make(gpt2_dir, tmp_path / "c").reference.state_dict() == {"ref_logps": {}}


def test_a_trained_policy_cannot_become_the_precomputed_reference(gpt2_dir, tmp_path):
    trainer = make(gpt2_dir, tmp_path, precompute_ref_log_probs=True, max_steps=1)
    trainer.training_step(trainer._step_indices(0))  # on-the-fly: the untrained policy is the reference
    with pytest.raises(RuntimeError, match="already trained"):
        trainer.precompute_reference()
