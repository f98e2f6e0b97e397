"""DPOTrainer on tiny models saved and reloaded with from_pretrained: references, accumulation,
checkpoints and resume, reproducibility, DDP."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import PAIRS, assert_same_weights, load, weights, write_jsonl

from fastdpo import DPOConfig, DPOTrainer, sequence_logps
from fastdpo.train import checkpoint as ckpt
from fastdpo.train.data import collate
from fastdpo.train.trainer import lr_lambda

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_trainer(model_dir, out, data=PAIRS, ref_model=None, eval_data=None, **options):
    model, tokenizer = load(model_dir)
    config = dict(
        output_dir=str(out), learning_rate=1e-2, max_length=64, max_prompt_length=32, progress_bar=False
    )
    config.update(options)
    return DPOTrainer(
        model, tokenizer, data, config=DPOConfig(**config), ref_model=ref_model, eval_data=eval_data
    )


def batch_logps(model, trainer, indices):
    batch = collate([trainer.splits["train"].pairs[i] for i in indices], trainer.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def test_import_fastdpo_does_not_load_the_trainer():
    code = (
        "import sys, fastdpo\n"
        "loaded = [m for m in sys.modules if m.startswith(('fastdpo.train', 'transformers'))]\n"
        "assert not loaded, loaded\n"
        "assert fastdpo.DPOTrainer.__module__ == 'fastdpo.train.trainer'  # loaded on first use\n"
        "assert 'fastdpo.train' in sys.modules\n"
        "print(fastdpo.DPOConfig().beta)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "0.1"
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        import fastdpo

        fastdpo.NotAThing  # noqa: B018


def test_lr_schedule_warms_up_then_decays():
    linear, cosine = lr_lambda(2, 10, "linear"), lr_lambda(2, 10, "cosine")
    assert [round(linear(s), 4) for s in range(4)] == [0.3333, 0.6667, 1.0, 0.875]
    assert linear(10) == 0.0 and cosine(2) == 1.0 and abs(cosine(6) - 0.5) < 1e-9 and cosine(10) < 1e-12
    assert lr_lambda(0, 10, "constant")(7) == 1.0


def test_precomputed_reference_equals_frozen_copy(gpt2_dir, tmp_path):
    copy = make_trainer(gpt2_dir, tmp_path / "copy", max_steps=3, per_device_train_batch_size=2)
    pre = make_trainer(
        gpt2_dir, tmp_path / "pre", max_steps=3, per_device_train_batch_size=2, precompute_ref_log_probs=True
    )
    assert pre.ref_model is None and copy.ref_model is not None
    pre.precompute_reference()
    expected = batch_logps(copy.ref_model, copy, list(range(len(PAIRS))))
    table = pre.reference.tables["train"]
    # rtol: one float32 ulp of a ~150-nat sum (the fused path's GEMM kernel is not the model's)
    torch.testing.assert_close(torch.cat([table[:, 0], table[:, 1]]), expected, atol=1e-5, rtol=1e-6)
    a, b = copy.train(), pre.train()
    assert pre.ref_model is None
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margins"] - y["rewards/margins"]) < 1e-5
    assert_same_weights(weights(copy.model), weights(pre.model), atol=1e-5)


def test_precomputed_reference_cannot_score_new_data_after_training(gpt2_dir, tmp_path):
    trainer = make_trainer(gpt2_dir, tmp_path, max_steps=1, precompute_ref_log_probs=True)
    assert trainer.evaluate(PAIRS[:2])["custom"]["pairs"] == 2  # before training, the policy is the reference
    trainer.train()
    with pytest.raises(ValueError, match="no reference for this data"):
        trainer.evaluate(PAIRS[:2])


def test_reference_free_loss(gpt2_dir, tmp_path):
    trainer = make_trainer(
        gpt2_dir, tmp_path, max_steps=1, per_device_train_batch_size=4, reference_free=True
    )
    assert trainer.ref_model is None
    indices = trainer._step_indices(0)
    logps = batch_logps(trainer.model, trainer, indices)
    pi_c, pi_r = logps.chunk(2)
    expected = -F.logsigmoid(0.1 * (pi_c - pi_r)).mean().item()
    metrics = trainer.train()[0]
    assert abs(metrics["loss"] - expected) < 1e-5
    assert abs(metrics["rewards/chosen"] - 0.1 * pi_c.mean().item()) < 1e-5


def capture_steps(trainer):
    """Record (weights, gradients) each time the optimizer is about to step."""
    seen = []

    def record(optimizer, args, kwargs):
        params = list(trainer.model.parameters())
        seen.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))

    trainer.optimizer.register_step_pre_hook(record)
    return seen


def test_gradient_accumulation_matches_one_big_batch(gpt2_dir, tmp_path):
    # 2 micro-batches of 1 pair == 1 batch of 2 pairs; the 3rd step of 6 pairs is an odd epoch boundary
    accumulated = make_trainer(
        gpt2_dir, tmp_path / "a", max_steps=4, per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    single = make_trainer(gpt2_dir, tmp_path / "b", max_steps=4, per_device_train_batch_size=2)
    seen_a, seen_b = capture_steps(accumulated), capture_steps(single)
    a, b = accumulated.train(), single.train()
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-5)
    assert [m["grad_norm"] for m in a] == pytest.approx([m["grad_norm"] for m in b], rel=1e-4)
    (_, first_a), (_, first_b) = seen_a[0], seen_b[0]  # same starting weights: same gradient
    for g, h in zip(first_a, first_b):
        torch.testing.assert_close(g, h, atol=1e-7, rtol=1e-5)
    # Adam magnifies float noise in near-zero gradients, so later weights agree a little less tightly
    assert_same_weights(weights(accumulated.model), weights(single.model), atol=1e-4)


def test_short_last_batch_is_weighted_by_pairs(gpt2_dir, tmp_path):
    # 5 pairs, global batch 4: the second step holds one pair; its gradient is that pair's, not a quarter of it
    four = make_trainer(
        gpt2_dir,
        tmp_path / "a",
        data=PAIRS[:5],
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=0,
    )
    steps = capture_steps(four)
    four.train()
    (last,) = four._step_indices(1)
    alone = make_trainer(gpt2_dir, tmp_path / "b", data=[PAIRS[last]], max_steps=1, max_grad_norm=0)
    with torch.no_grad():  # the policy where step 2 started; the reference stays the initial model
        for param, value in zip(alone.model.parameters(), steps[1][0]):
            param.copy_(value)
    expected = capture_steps(alone)
    alone.train()
    for got, want in zip(steps[1][1], expected[0][1]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_seed_makes_runs_reproducible(gpt2_dir, tmp_path):
    runs = [
        make_trainer(
            gpt2_dir,
            tmp_path / f"r{i}",
            max_steps=3,
            per_device_train_batch_size=2,
            seed=s,
            disable_dropout=False,
        )
        for i, s in enumerate((1, 1, 2))
    ]
    for run in runs:
        run.train()
    assert_same_weights(weights(runs[0].model), weights(runs[1].model))
    with pytest.raises(AssertionError):
        assert_same_weights(weights(runs[0].model), weights(runs[2].model), atol=1e-6)


def test_metrics_log_uses_trl_names(gpt2_dir, tmp_path):
    trainer = make_trainer(
        gpt2_dir, tmp_path, max_steps=3, per_device_train_batch_size=2, eval_data=PAIRS[:2]
    )
    trainer.evaluate()
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    names = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "learning_rate",
        "grad_norm",
        "step",
        "epoch",
    }
    assert names <= set(steps[0])
    assert lines[0]["step"] == 0 and lines[0]["train_rewards/accuracies"] == 0.0  # ties before training
    assert lines[0]["eval_pairs"] == 2
    assert steps[0]["learning_rate"] == 1e-2


def test_evaluate_log_prob_accuracy(gpt2_dir, tmp_path):
    trainer = make_trainer(gpt2_dir, tmp_path, max_steps=1)
    result = trainer.evaluate()["train"]
    pi_c, pi_r = batch_logps(trainer.model, trainer, list(range(len(PAIRS)))).chunk(2)
    assert result["logps/accuracies"] == pytest.approx((pi_c > pi_r).float().mean().item())
    assert result["rewards/accuracies"] == 0.0 and result["pairs"] == len(PAIRS)
    assert result["loss"] == pytest.approx(0.6931, abs=1e-4)


def test_gradient_checkpointing_gives_the_same_step(gpt2_dir, tmp_path):
    plain = make_trainer(gpt2_dir, tmp_path / "a", max_steps=2, per_device_train_batch_size=3)
    checkpointed = make_trainer(
        gpt2_dir, tmp_path / "b", max_steps=2, per_device_train_batch_size=3, gradient_checkpointing=True
    )
    plain.train(), checkpointed.train()
    assert_same_weights(weights(plain.model), weights(checkpointed.model), atol=1e-5)


def test_untied_llama_trains(llama_dir, tmp_path):
    trainer = make_trainer(
        llama_dir, tmp_path, max_steps=4, per_device_train_batch_size=3, learning_rate=5e-3
    )
    before = weights(trainer.model)
    history = trainer.train()
    assert history[-1]["rewards/margins"] > 0
    after = weights(trainer.model)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_resume_ends_with_the_same_weights(gpt2_dir, tmp_path, monkeypatch):
    # Dropout stays on so that the restored RNG state matters too.
    options = dict(
        max_steps=6,
        per_device_train_batch_size=2,
        save_steps=2,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        disable_dropout=False,
    )
    full = make_trainer(gpt2_dir, tmp_path / "full", **options)
    full.train()

    interrupted = make_trainer(gpt2_dir, tmp_path / "resumed", **options)
    step = DPOTrainer.training_step

    def killed_during_step_4(self, indices):
        if self.step == 3:
            raise KeyboardInterrupt("simulated kill")
        return step(self, indices)

    monkeypatch.setattr(DPOTrainer, "training_step", killed_during_step_4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.undo()
    assert ckpt.last_checkpoint(tmp_path / "resumed").name == "checkpoint-2"

    resumed = make_trainer(gpt2_dir, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.step == 6
    assert_same_weights(weights(full.model), weights(resumed.model))
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 of the killed run was dropped, then redone
    state = ckpt.load_state(tmp_path / "resumed" / "checkpoint-6")
    assert state["step"] == 6 and "optimizer" in state and "rng" in state


def test_resume_with_precomputed_reference(gpt2_dir, tmp_path):
    options = dict(max_steps=4, per_device_train_batch_size=2, save_steps=2, precompute_ref_log_probs=True)
    full = make_trainer(gpt2_dir, tmp_path / "full", **options)
    full.train()
    first = make_trainer(gpt2_dir, tmp_path / "part", **options)
    first.total_steps = 2  # stopped after step 2
    first.train()
    resumed = make_trainer(gpt2_dir, tmp_path / "part", **options)
    resumed.train(resume_from_checkpoint=tmp_path / "part" / "checkpoint-2")
    # the reference log-probs come from the checkpoint, not from the (trained) weights being resumed
    torch.testing.assert_close(resumed.reference.tables["train"], full.reference.tables["train"])
    assert_same_weights(weights(full.model), weights(resumed.model))


def test_checkpoint_is_atomic(gpt2_dir, tmp_path, monkeypatch):
    trainer = make_trainer(gpt2_dir, tmp_path, max_steps=2, per_device_train_batch_size=2, save_steps=1)
    save_state = ckpt.save_state
    calls = []

    def fail_on_second_checkpoint(directory, state):
        calls.append(directory)
        if len(calls) == 2:
            (directory / "trainer_state.pt").write_bytes(b"partial")
            raise OSError("disk full")
        save_state(directory, state)

    monkeypatch.setattr(ckpt, "save_state", fail_on_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint-2" not in names and not [n for n in names if n.startswith(".tmp")]
    assert ckpt.last_checkpoint(tmp_path).name == "checkpoint-1"
    assert ckpt.load_state(tmp_path / "checkpoint-1")["step"] == 1
    model, _ = load(tmp_path / "checkpoint-1")  # a complete save_pretrained directory
    assert model.config.n_layer == 2


def test_write_atomically_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "final"
    ckpt.write_atomically(target, lambda d: (d / "a").write_text("1"))
    ckpt.write_atomically(target, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b", "fastdpo_manifest.json"]  # b's digest in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_ddp_two_processes_match_one_process(gpt2_dir, tmp_path):
    # 5 pairs, global batch 4: step 2 holds one pair, so rank 1 joins it with an empty share.
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:5])
    common = [
        "train",
        "--model",
        str(gpt2_dir),
        "--data",
        str(data),
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--no-plot",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastdpo",
    ]
    result = subprocess.run(
        command + common + ["--batch-size", "2", "--output-dir", str(tmp_path / "ddp")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "2 process(es)" in result.stdout and result.stdout.count("preference accuracy") == 1
    )  # rank 0 prints

    from fastdpo.train.cli import main

    assert main(common + ["--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    ddp, _ = load(tmp_path / "ddp" / "final")
    one, _ = load(tmp_path / "one" / "final")
    assert_same_weights(weights(ddp), weights(one), atol=5e-5)
    ddp_lines = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_lines = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in ddp_lines if "loss" in x] == [1, 2, 3]  # written once, by rank 0
    assert len(ddp_lines) == len(one_lines)
    for a, b in zip(ddp_lines, one_lines):  # metrics reduced over both ranks
        for key in ("loss", "rewards/margins", "train_rewards/accuracies", "train_logps/accuracies"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.parametrize("kind", ["gpt2_dir", "llama_dir"])
def test_fused_linear_step_matches_the_logits_step(kind, request, tmp_path):
    model_dir = request.getfixturevalue(kind)
    options = dict(max_steps=2, per_device_train_batch_size=3)
    fused = make_trainer(model_dir, tmp_path / "fused", fused_linear=True, **options)
    logits = make_trainer(model_dir, tmp_path / "logits", fused_linear=False, **options)
    assert fused.fused and not logits.fused
    # the fused trainer never runs the LM head as a layer, so no [2B, T, V] logits exist
    fused.model.get_output_embeddings().forward = lambda *a: pytest.fail("the fused path computed logits")
    seen_fused, seen_logits = capture_steps(fused), capture_steps(logits)
    a, b = fused.train(), logits.train()
    for x, y in zip(a, b):
        for key in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "logps/chosen",
            "logps/rejected",
            "logits/chosen",
        ):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
    for step, ((_, grads_fused), (_, grads_logits)) in enumerate(zip(seen_fused, seen_logits)):
        # After the first Adam step (lr 1e-2) float32 noise in gradients whose exact value is 0
        # (the attention's key bias) has moved weights by up to ~lr: later steps get 1e-5.
        for g, h in zip(grads_fused, grads_logits):
            torch.testing.assert_close(g, h, atol=1e-6 if step == 0 else 1e-5, rtol=1e-4)
    assert fused.evaluate()["train"] == pytest.approx(logits.evaluate()["train"], rel=1e-5, abs=1e-6)


def test_fused_linear_is_used_only_where_it_reproduces_the_logits(llama_dir, tmp_path):
    from fastdpo.train.lm import fused_linear_reason

    model, _ = load(llama_dir)
    assert fused_linear_reason(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_linear_reason(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert "not a plain nn.Linear" in fused_linear_reason(model)

    soft, tokenizer = load(llama_dir)
    soft.config.logit_scale = 0.5
    trainer = DPOTrainer(
        soft, tokenizer, PAIRS, config=DPOConfig(output_dir=str(tmp_path), progress_bar=False)
    )
    assert not trainer.fused and "logit_scale" in trainer.fused_reason
    with pytest.raises(ValueError, match="fused_linear=True but"):
        DPOTrainer(soft, tokenizer, PAIRS, config=DPOConfig(output_dir=str(tmp_path), fused_linear=True))


def test_bf16_autocast_is_an_option_on_cpu(llama_dir, tmp_path):
    assert not make_trainer(llama_dir, tmp_path / "default").bf16  # never by default on CPU (slow there)
    options = dict(max_steps=2, per_device_train_batch_size=3, bf16=True)
    fused = make_trainer(llama_dir, tmp_path / "fused", fused_linear=True, **options)
    logits = make_trainer(llama_dir, tmp_path / "logits", fused_linear=False, **options)
    a, b = fused.train(), logits.train()
    assert fused.bf16 and fused.fused
    for x, y in zip(a, b):  # both heads run in bfloat16: agreement to bfloat16's resolution
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-2)
        assert x["logps/chosen"] == pytest.approx(y["logps/chosen"], rel=1e-2)
