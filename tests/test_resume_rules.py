"""A resume continues the same run or is refused, listing what differs (issue 13, item 5)."""

import dataclasses
import json
import shutil

import pytest
from lm_helpers import PAIRS, assert_same_weights, load, save_tiny_lm, weights, write_jsonl
from run_helpers import make_trainer

from fastdpo import DPOConfig

RUN = dict(max_steps=4, per_device_train_batch_size=2, save_steps=2)


@pytest.fixture(scope="module")
def half_run(gpt2_dir, tmp_path_factory):
    """A run stopped after its checkpoint at step 2 (the configuration says 4 steps)."""
    out = tmp_path_factory.mktemp("half")
    trainer = make_trainer(gpt2_dir, out, **RUN)
    trainer.total_steps = 2
    trainer.train()
    return out


def resume(gpt2_dir, out, **changes):
    trainer = make_trainer(gpt2_dir, out, **{**RUN, **changes})
    trainer.train(resume_from_checkpoint=out / "checkpoint-2")
    return trainer


def test_every_option_has_a_resume_rule():
    from fastdpo.train.run_config import RESUME_RULES

    assert set(RESUME_RULES) == {f.name for f in dataclasses.fields(DPOConfig)}


def test_the_checkpoint_holds_the_run_configuration(half_run):
    record = json.loads((half_run / "checkpoint-2" / "run_config.json").read_text())
    assert record["config"]["learning_rate"] == 1e-2 and record["config"]["seed"] == 42
    assert len(record["train_data"]) == 64 and record["model"]["state_dict_elements"] > 0


def test_options_that_change_the_run_are_refused_all_named(gpt2_dir, half_run):
    changes = dict(
        learning_rate=2e-2,
        seed=7,
        per_device_train_batch_size=3,
        beta=0.2,
        precompute_ref_log_probs=True,
        gradient_accumulation_steps=2,
        max_length=60,
    )
    with pytest.raises(ValueError, match="cannot resume from") as error:
        resume(gpt2_dir, half_run, **changes)
    message = str(error.value)
    for name in changes:
        assert name in message, name
    assert "learning_rate 0.01 -> 0.02" in message and "\n" not in message


def test_changed_data_is_refused(gpt2_dir, half_run, tmp_path):
    other = [dict(p, chosen=p["chosen"] + " Really.") for p in PAIRS]
    with pytest.raises(ValueError, match="train_data"):
        make_trainer(gpt2_dir, half_run, data=other, **RUN).train(
            resume_from_checkpoint=half_run / "checkpoint-2"
        )
    with pytest.raises(ValueError, match="eval_data"):
        make_trainer(gpt2_dir, half_run, eval_data=PAIRS[:2], **RUN).train(resume_from_checkpoint=True)


def test_the_same_data_from_another_file_is_the_same_run(gpt2_dir, half_run, tmp_path):
    out = shutil.copytree(half_run, tmp_path / "run")
    moved = write_jsonl(tmp_path / "moved.jsonl", PAIRS)
    trainer = make_trainer(gpt2_dir, out, data=moved, **RUN)
    trainer.train(resume_from_checkpoint=out / "checkpoint-2")
    assert trainer.step == 4


def test_another_model_is_refused(half_run, tmp_path):
    other = save_tiny_lm(tmp_path / "other", "gpt2", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="model {state_dict_elements="):
        resume(other, half_run)


def test_fewer_steps_than_the_checkpoint_are_refused(gpt2_dir, half_run):
    with pytest.raises(ValueError, match="this run ends at step 1, the checkpoint is at step 2"):
        resume(gpt2_dir, half_run, max_steps=1)


def test_options_that_extend_or_observe_the_run_are_allowed(gpt2_dir, tmp_path):
    run = dict(RUN, lr_scheduler_type="constant")  # a schedule that does not depend on the length
    first = make_trainer(gpt2_dir, tmp_path / "run", **run)
    first.total_steps = 2
    first.train()
    full = make_trainer(gpt2_dir, tmp_path / "full", **{**run, "max_steps": 6})
    full.train()
    shutil.copytree(tmp_path / "run", tmp_path / "another-way")
    observed = dict(
        max_steps=6,
        save_steps=3,
        eval_steps=1,
        save_total_limit=1,
        progress_bar=False,
        per_device_eval_batch_size=5,
        metrics_file="other.jsonl",
    )
    resumed = make_trainer(gpt2_dir, tmp_path / "run", **{**run, **observed})
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 6
    checkpoints = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-6"]
    assert_same_weights(weights(full.model), weights(resumed.model))  # the same run, longer
    # the same computation another way: the logits path, recomputed activations
    another_way = make_trainer(
        gpt2_dir, tmp_path / "another-way", **run, fused_linear=False, gradient_checkpointing=True
    )
    another_way.train(resume_from_checkpoint=True)
    assert another_way.step == 4


def test_the_loss_options_are_refused_too(gpt2_dir, half_run):
    changes = dict(
        f_divergence_type="js_divergence",
        f_alpha_divergence_coef=0.3,
        discopop_tau=0.1,
        simpo_gamma=1.0,
        average_log_prob=True,
        loss_weights=[2.0],
        use_weighting=True,
        ld_alpha=0.5,
    )
    with pytest.raises(ValueError, match="cannot resume from") as error:
        resume(gpt2_dir, half_run, **changes)
    for name in changes:
        assert name in str(error.value), name


def test_a_loss_type_and_the_list_of_it_are_the_same_run(gpt2_dir, half_run, tmp_path):
    """ "sigmoid" (the checkpoint's) is ["sigmoid"], and no loss_weights is a weight of 1 each."""
    out = shutil.copytree(half_run, tmp_path / "run")
    trainer = make_trainer(gpt2_dir, out, **{**RUN, "loss_type": ["sigmoid"], "loss_weights": [1.0]})
    trainer.train(resume_from_checkpoint=out / "checkpoint-2")
    assert trainer.step == 4
    with pytest.raises(ValueError, match=r"loss_weights \[1.0\] -> \[0.5\]"):
        resume(gpt2_dir, half_run, loss_type=["sigmoid"], loss_weights=[0.5])


def test_max_prompt_length_auto_is_compared_by_its_value(gpt2_dir, half_run, tmp_path):
    out = shutil.copytree(half_run, tmp_path / "run")  # max_length 64, max_prompt_length 32
    trainer = make_trainer(gpt2_dir, out, **{**RUN, "max_prompt_length": "auto"})  # resolves to 32
    trainer.train(resume_from_checkpoint=out / "checkpoint-2")
    assert trainer.step == 4
    with pytest.raises(ValueError, match="max_prompt_length 32 -> 16"):
        make_trainer(gpt2_dir, out, **{**RUN, "max_prompt_length": 16}).train(resume_from_checkpoint=True)


def test_another_reference_model_is_refused(gpt2_dir, half_run, tmp_path):
    other, _ = load(save_tiny_lm(tmp_path / "other", "gpt2", seed=1))
    with pytest.raises(ValueError, match=r"ref_model null -> \{state_dict_elements="):
        resume(gpt2_dir, half_run, ref_model=other)
    with pytest.raises(ValueError, match=r"ref_model null -> \{state_dict_elements="):
        resume(gpt2_dir, half_run, ref_model=other, precompute_ref_log_probs=True)  # held until precomputed


def test_the_readme_says_which_options_are_refused_and_which_allowed():
    import pathlib

    from fastdpo.train.arguments import cli_fields, flags
    from fastdpo.train.run_config import CHANGES, RESUME_RULES

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme[readme.index("`--resume` continues the same run or refuses") :].split("\n\n")[0]
    refused, allowed = paragraph.split("Allowed:")
    assert "`fastdpo.train.run_config.RESUME_RULES`" in allowed
    for field in cli_fields("train"):
        names = [flag[2:] for flag in flags(field)]
        where = refused if RESUME_RULES[field.name] == CHANGES else allowed
        assert any(f"`--{n}`" in where or f"`--no-{n}`" in where for n in names), field.name
