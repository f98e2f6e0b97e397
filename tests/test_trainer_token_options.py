"""DPOTrainer with TRL's token-level options: use_weighting (WPO) and ld_alpha (LD-DPO) reach the
loss (reference included), entropy / mean_token_accuracy / num_tokens are logged as TRL defines
them, and a step's metrics leave the device once, whatever the accumulation.

``PATHS``: the loss paths these run on. WPO and the token metrics need token statistics from the
loss's kernel: on the logits path ``fused_logps(statistics=True)`` (the torch backend has it), on
the fused linear path ``fused_linear_logps(statistics=True)`` (issue 16 item 2). A path joins by
adding it here.
"""

import shutil

import pytest
import torch
from lm_helpers import PAIRS, load
from run_helpers import make_trainer

from benchmarks.ground_truth import float64_token_statistics
from fastdpo import DPOConfig, DPOTrainer
from fastdpo.modules import DPOOutput
from fastdpo.train.data import collate
from fastdpo.train.step_metrics import StepSums

PATHS = {
    "logits-torch": dict(fused_linear=False, backend="torch"),
    "linear-torch": dict(fused_linear=True, backend="torch"),
    "logits-native": dict(fused_linear=False, backend="native"),
    "linear-native": dict(fused_linear=True, backend="native"),
}


def step_batch(trainer, step):
    return collate([trainer.splits["train"].pairs[i] for i in trainer._step_indices(step)], trainer.pad_id)


def float64_tokens(model, batch):
    """Per-token log-probs and statistics of ``model`` on ``batch``, in float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    target, counted = labels[:, 1:], labels[:, 1:] != -100
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return torch.where(counted, token, 0.0), counted, float64_token_statistics(logits, labels)


@pytest.mark.parametrize("path", PATHS)
def test_use_weighting_and_ld_alpha_reach_the_loss(gpt2_dir, llama_dir, tmp_path, path):
    """Another model as the reference, so the reference's LD-DPO split matters too."""
    model, tokenizer = load(gpt2_dir)
    ref_model, _ = load(llama_dir)
    options = dict(use_weighting=True, ld_alpha=0.3, **PATHS[path])
    config = DPOConfig(
        output_dir=str(tmp_path),
        max_length=64,
        max_steps=1,
        per_device_train_batch_size=len(PAIRS),
        progress_bar=False,
        **options,
    )
    trainer = DPOTrainer(model, tokenizer, PAIRS, config=config, ref_model=ref_model)
    batch = step_batch(trainer, 0)
    pi_tokens, counted, stats = float64_tokens(trainer.model, batch)
    ref_tokens, _, _ = float64_tokens(ref_model, batch)
    # TRL 1.16's formulas, written out (tests/test_token_options.py runs TRL's own code)
    lengths = counted.sum(-1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)[:, None]
    position = counted.cumsum(-1)
    weight = torch.where(position <= shared, 1.0, 0.3) * counted

    def logps(tokens):
        return (tokens * weight).sum(-1).chunk(2)

    (pi_c, pi_r), (ref_c, ref_r) = logps(pi_tokens), logps(ref_tokens)
    losses = -torch.nn.functional.logsigmoid(0.1 * ((pi_c - ref_c) - (pi_r - ref_r)))
    w = torch.exp((pi_tokens - stats["log_sum_sq_probs"]).sum(-1) / lengths).chunk(2)
    expected = (losses * w[0] * w[1]).mean().item()
    got = trainer.train()[0]
    assert got["loss"] == pytest.approx(expected, rel=1e-4)
    assert got["logps/chosen"] == pytest.approx(pi_c.mean().item(), rel=1e-4)  # LD-DPO's, as TRL logs


@pytest.mark.parametrize("path", PATHS)
def test_token_metrics_and_num_tokens_are_logged_as_trl(gpt2_dir, tmp_path, path):
    trainer = make_trainer(
        gpt2_dir,
        tmp_path / "a",
        max_steps=3,
        per_device_train_batch_size=2,
        token_metrics=True,
        **PATHS[path],
    )
    batches = [step_batch(trainer, s) for s in range(3)]
    _, counted, stats = float64_tokens(trainer.model, batches[0])
    history = trainer.train()
    pairs = counted.shape[0] // 2
    assert history[0]["entropy"] == pytest.approx((stats["entropy"].sum() / counted.sum()).item(), rel=1e-5)
    accuracy = stats["is_top1"][:pairs].sum() / counted[:pairs].sum()
    assert history[0]["mean_token_accuracy"] == pytest.approx(accuracy.item(), abs=1e-9)
    # num_tokens: TRL's, the attention mask (prompt + completion, both rows) summed over the steps
    seen = torch.tensor([b["attention_mask"].sum().item() for b in batches]).cumsum(0).tolist()
    assert [h["num_tokens"] for h in history] == seen


def test_without_token_metrics_only_num_tokens_is_added(gpt2_dir, tmp_path):
    history = make_trainer(gpt2_dir, tmp_path, max_steps=1, per_device_train_batch_size=2).train()
    assert "entropy" not in history[0] and "mean_token_accuracy" not in history[0]
    assert history[0]["num_tokens"] > 0


def test_token_metrics_do_not_depend_on_the_accumulation(gpt2_dir, tmp_path):
    """Token means over the whole step: 2 micro-batches of 1 pair give what 1 batch of 2 gives."""
    options = dict(max_steps=2, token_metrics=True, **PATHS["logits-torch"])
    split = make_trainer(
        gpt2_dir, tmp_path / "a", per_device_train_batch_size=1, gradient_accumulation_steps=2, **options
    ).train()
    whole = make_trainer(gpt2_dir, tmp_path / "b", per_device_train_batch_size=2, **options).train()
    for name in ("entropy", "mean_token_accuracy", "num_tokens", "loss"):
        assert [h[name] for h in split] == pytest.approx([h[name] for h in whole], rel=1e-5), name


def test_metrics_leave_the_device_once_per_optimizer_step(gpt2_dir, tmp_path, monkeypatch):
    trainer = make_trainer(
        gpt2_dir,
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=3,
        token_metrics=True,
        **PATHS["logits-torch"],
    )
    reads, add = [], StepSums.add

    def no_sync(*args, **kwargs):
        raise AssertionError("a micro-batch read a metric off the device")

    def guarded_add(self, out, pairs):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "__float__"):
                m.setattr(torch.Tensor, name, no_sync)
            add(self, out, pairs)

    def counted_reduce(self, runtime, reduce=StepSums.reduce):
        reads.append(1)
        return reduce(self, runtime)

    monkeypatch.setattr(DPOOutput, "metrics", no_sync)
    monkeypatch.setattr(StepSums, "add", guarded_add)
    monkeypatch.setattr(StepSums, "reduce", counted_reduce)
    history = trainer.train()
    assert len(reads) == 2 and all("entropy" in h for h in history)


def test_num_tokens_continues_after_resume(gpt2_dir, tmp_path):
    # 6 pairs, 2 a step: 3 steps an epoch; the resume at step 4 is inside the second epoch
    run = dict(max_steps=5, per_device_train_batch_size=2, save_steps=4)
    full = make_trainer(gpt2_dir, tmp_path / "full", **run).train()
    half = make_trainer(gpt2_dir, tmp_path / "half", **run)
    half.total_steps = 4
    half.train()
    shutil.rmtree(tmp_path / "half" / "checkpoint-5", ignore_errors=True)
    resumed = make_trainer(gpt2_dir, tmp_path / "half", **run)
    rest = resumed.train(resume_from_checkpoint=True)
    assert [h["step"] for h in rest] == [5]
    assert rest[0]["num_tokens"] == full[-1]["num_tokens"]


@pytest.mark.parametrize("fused_linear", [True, False], ids=["linear", "logits"])
def test_precomputed_reference_is_ld_weighted_too(gpt2_dir, tmp_path, fused_linear):
    """LD-DPO needs no token statistics: this runs on the default backend of either path."""
    options = dict(max_steps=1, per_device_train_batch_size=3, ld_alpha=0.2, fused_linear=fused_linear)
    copy = make_trainer(gpt2_dir, tmp_path / "copy", **options)
    precomputed = make_trainer(gpt2_dir, tmp_path / "pre", precompute_ref_log_probs=True, **options)
    plain = make_trainer(gpt2_dir, tmp_path / "plain", **{**options, "ld_alpha": None})
    precomputed.precompute_reference()
    (a,), (b,), (c,) = copy.train(), precomputed.train(), plain.train()
    # before the first step policy and reference agree, LD-DPO's weighted sums included
    assert a["rewards/chosen"] == pytest.approx(0, abs=1e-6) and b["rewards/chosen"] == pytest.approx(
        0, abs=1e-6
    )
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], rel=1e-6)
    assert abs(a["logps/chosen"] - c["logps/chosen"]) > 1e-3  # ld_alpha made a difference
