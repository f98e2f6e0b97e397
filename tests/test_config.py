"""DPOConfig: the prompt budget rule, option checks, and the loss options reaching the loss."""

import dataclasses

import pytest
import torch
from lm_helpers import PAIRS, load

from fastdpo import DPOConfig, DPOTrainer, preference_loss, sequence_logps
from fastdpo.train.data import collate


@pytest.mark.parametrize(
    "max_length, expected", [(1024, 512), (600, 512), (513, 512), (512, 256), (256, 128), (64, 32)]
)
def test_max_prompt_length_auto_halves_a_smaller_max_length(max_length, expected):
    assert DPOConfig(max_length=max_length).max_prompt_length == expected


def test_an_explicit_max_prompt_length_is_kept_or_rejected():
    assert DPOConfig(max_length=256, max_prompt_length=200).max_prompt_length == 200
    assert DPOConfig(max_length=256, max_prompt_length=None).max_prompt_length is None
    with pytest.raises(ValueError, match=r"max_prompt_length \(512\) must be below max_length \(256\)"):
        DPOConfig(max_length=256, max_prompt_length=512)
    with pytest.raises(ValueError, match="max_prompt_length must be an int, 'auto' or None, got 'half'"):
        DPOConfig(max_prompt_length="half")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lr_scheduler_type="step"), "lr_scheduler_type must be one of linear, cosine, constant"),
        (dict(f_divergence_type="kl"), "f_divergence_type must be one of reverse_kl"),
        (dict(loss_type=["sigmoid", "nope"]), "unknown loss_type 'nope'"),
        (
            dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
            "loss_weights has 1 entries for 2 loss types",
        ),
        (
            dict(loss_type="nca_pair", f_divergence_type="forward_kl"),
            "f_divergence_type 'forward_kl' works only",
        ),
        (dict(precompute_ref_log_probs=True, reference_free=True), "exclusive"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be >= 1"),
        (dict(ld_alpha=2.0), r"ld_alpha must be in \[0, 1\]"),
        (dict(use_weighting=True, loss_type="aot"), "use_weighting=True does not work with loss_type"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        DPOConfig(**options)


def test_every_field_has_help_and_a_group():
    for f in dataclasses.fields(DPOConfig):
        assert f.metadata["help"].endswith(".") and f.metadata["group"], f.name


def first_step_loss(policy_dir, ref_dir, tmp_path, **options):
    model, tokenizer = load(policy_dir)
    ref_model, _ = load(ref_dir)
    config = DPOConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        max_length=64,
        max_steps=1,
        per_device_train_batch_size=len(PAIRS),
        progress_bar=False,
        **options,
    )
    trainer = DPOTrainer(model, tokenizer, PAIRS, config=config, ref_model=ref_model)
    batch = collate([trainer.splits["train"].pairs[i] for i in trainer._step_indices(0)], trainer.pad_id)
    with torch.no_grad():
        pi, ref = (
            sequence_logps(
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )
            for m in (trainer.model, ref_model)
        )
    return trainer.train()[0]["loss"], pi, ref, (batch["labels"][:, 1:] != -100).sum(1)


def test_loss_options_reach_the_loss(gpt2_dir, llama_dir, tmp_path):
    # Another model as the reference, so that pi - ref is far from 0 and every option changes the loss.
    options = dict(
        loss_type=["sigmoid", "discopop", "sft"],
        loss_weights=[0.5, 1.0, 2.0],
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.3,
        discopop_tau=0.2,
    )
    got, pi, ref, counts = first_step_loss(gpt2_dir, llama_dir, tmp_path, **options)
    (pi_c, pi_r), (ref_c, ref_r), (n_c, n_r) = pi.chunk(2), ref.chunk(2), counts.chunk(2)

    def expected(**changes):
        losses, _, _ = preference_loss(
            pi_c,
            pi_r,
            ref_c,
            ref_r,
            beta=0.1,
            chosen_counts=n_c,
            rejected_counts=n_r,
            **{**options, **changes},
        )
        return losses.mean().item()

    assert got == pytest.approx(expected(), rel=1e-5, abs=1e-5)
    for changes in (
        dict(loss_weights=None),
        dict(f_alpha_divergence_coef=0.5),
        dict(discopop_tau=0.05),
        dict(f_divergence_type="reverse_kl"),
    ):
        assert abs(expected(**changes) - got) > 1e-3, changes  # each option makes a difference


def test_simpo_gamma_reaches_the_loss(gpt2_dir, llama_dir, tmp_path):
    options = dict(loss_type="simpo", simpo_gamma=1.5)
    got, pi, ref, counts = first_step_loss(gpt2_dir, llama_dir, tmp_path, **options)
    (pi_c, pi_r), (n_c, n_r) = pi.chunk(2), counts.chunk(2)
    z = 0.1 * (pi_c / n_c - pi_r / n_r) - 1.5
    assert got == pytest.approx(-torch.nn.functional.logsigmoid(z).mean().item(), rel=1e-5)


def test_a_list_of_loss_types_with_weights_trains(gpt2_dir, tmp_path):
    model, tokenizer = load(gpt2_dir)
    config = DPOConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        max_length=64,
        max_steps=4,
        per_device_train_batch_size=3,
        progress_bar=False,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.1],
    )
    history = DPOTrainer(model, tokenizer, PAIRS, config=config).train()
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["rewards/margins"] > 0 and history[-1]["rewards/accuracies"] > 0.5
