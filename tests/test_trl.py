"""fastdpo.trl.DPOTrainer against TRL 1.16's own DPOTrainer: same logged metrics and weights in
float32 while TRL's fused head never runs; fallbacks; PEFT; precomputed references; torchrun."""

import copy
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from lm_helpers import PAIRS, build_tokenizer  # noqa: E402
from trl_helpers import sgd_config  # noqa: E402

import fastdpo.trl  # noqa: E402
import fastdpo.trl.lm_head as fastdpo_lm_head  # noqa: E402
from fastdpo.trl import head_statistics  # noqa: E402
from fastdpo.trl.statistics import STATISTICS  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Trainer's log keys that are timings, not results.
TIMINGS = {
    f"{split}_{key}"
    for split in ("train", "eval")
    for key in ("runtime", "samples_per_second", "steps_per_second")
}
# What TRL 1.16's DPOTrainer supports besides sigmoid and ipo (tested alone): one run with all of them.
OTHER_LOSSES = [
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Trainer creates its output_dir: let that be in the test's own directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_lm(tokenizer, kind: str = "gpt2"):
    """2 layers, hidden 32, vocabulary ~300: GPT-2 (tied head), Llama (untied), Phi (head with a
    bias), Gemma 2 (soft-capped logits); the same weights for the same kind."""
    import transformers as tf

    torch.manual_seed(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = dict(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **ids))
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        **ids,
    )
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **sizes))
    if kind == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**sizes))
    if kind == "gemma2":
        config = tf.Gemma2Config(head_dim=16, final_logit_softcapping=5.0, **sizes)
        return tf.Gemma2ForCausalLM(config)
    raise ValueError(kind)


def train(trainer_cls, tokenizer, kind="gpt2", model=None, with_ref=True, peft_config=None, **config):
    """Train 3 steps of 2 pairs on PAIRS (trl_helpers.sgd_config); returns (log history, weight
    updates, trainer)."""
    model = tiny_lm(tokenizer, kind) if model is None else model
    args = sgd_config("unused", **(dict(per_device_train_batch_size=2) | config))
    trainer = trainer_cls(
        model=model,
        ref_model=copy.deepcopy(model) if with_ref else None,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        eval_dataset=Dataset.from_list(PAIRS[:2]) if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    updates = {k: v.detach() - before[k] for k, v in trainer.model.state_dict().items()}
    return trainer.state.log_history, updates, trainer


def forbid_trl_head(monkeypatch):
    """From now on TRL's fused head (its chunked log-prob kernel) raises if anything calls it."""

    class Forbidden:
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("TRL's own fused LM head ran")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Forbidden)


def assert_same_run(expected, actual, rtol=1e-4, ignore=()):
    """Same logged metrics (but ``ignore``) at every step and same weight updates, up to ``rtol``."""
    logs_a, updates_a, trainer = expected
    logs_b, updates_b, _ = actual
    weights = trainer.model.state_dict()
    assert len(logs_a) == len(logs_b)
    for step_a, step_b in zip(logs_a, logs_b):
        assert step_a.keys() == step_b.keys()
        # The rewards are beta times differences of float32 sums of ~100 nats: each sum carries
        # its own rounding (float32 eps times its size, 1.3e-5 at 108 nats), whichever GEMM kernel
        # made the logits, so their absolute floor is four such roundings times beta (0.1, TRL's
        # default here), not a fixed 1e-6.
        logps = max(abs(step_a.get(k, 0.0)) for k in ("logps/chosen", "logps/rejected"))
        rewards_floor = 4 * 0.1 * torch.finfo(torch.float32).eps * max(logps, 1.0)
        for key in step_a.keys() - TIMINGS - set(ignore):
            a, b = step_a[key], step_b[key]
            floor = max(1e-6, rewards_floor) if key.startswith("rewards/") else 1e-6
            assert abs(a - b) <= rtol * max(abs(a), abs(b)) + floor, (step_a.get("step"), key, a, b)
    assert updates_a.keys() == updates_b.keys()
    for name, a in updates_a.items():
        worst = (a - updates_b[name]).abs().max().item()
        rounding = 2 * torch.finfo(torch.float32).eps * weights[name].abs().max().item()  # of w - w0
        assert worst <= rtol * a.abs().max().item() + rounding, (name, worst)


CASES = {
    "sigmoid": dict(loss_type="sigmoid", gradient_checkpointing=True),  # TRL's default checkpointing
    "ipo": dict(loss_type="ipo", kind="llama"),
    "other_losses": dict(loss_type=OTHER_LOSSES, label_smoothing=0.1),
    # WPO weighs each pair by its sequences' per-token probabilities (about 1/V^2 here): a larger
    # learning rate gives updates of the usual size
    "use_weighting": dict(use_weighting=True, kind="phi", learning_rate=1e3),
    "ld_alpha": dict(ld_alpha=0.5, kind="llama"),
}


@pytest.mark.parametrize("case", CASES)
def test_same_metrics_and_weights_as_trl(case, tokenizer, monkeypatch):
    config = dict(CASES[case])
    expected = train(trl.DPOTrainer, tokenizer, **config)
    forbid_trl_head(monkeypatch)
    actual = train(fastdpo.trl.DPOTrainer, tokenizer, **config)
    assert_same_run(expected, actual)
    assert {"entropy", "mean_token_accuracy", "logits/chosen", "rewards/margins"} <= actual[0][0].keys()


def test_precomputed_reference_and_evaluation(tokenizer, monkeypatch):
    # No reference model: TRL scores the data with the policy before training, in its constructor.
    config = dict(precompute_ref_log_probs=True, with_ref=False, eval_strategy="steps", eval_steps=2)
    expected = train(trl.DPOTrainer, tokenizer, **config)
    forbid_trl_head(monkeypatch)
    calls = []
    statistics = fastdpo_lm_head.head_statistics
    monkeypatch.setattr(fastdpo_lm_head, "head_statistics", lambda *a: calls.append(a[-1]) or statistics(*a))
    precompute = fastdpo.trl.DPOTrainer.compute_ref_log_probs
    precomputed = []
    monkeypatch.setattr(
        fastdpo.trl.DPOTrainer,
        "compute_ref_log_probs",
        lambda self, *a: precomputed.append(1) or precompute(self, *a),
    )
    actual = train(fastdpo.trl.DPOTrainer, tokenizer, **config)
    assert actual[2].ref_model is None and precomputed  # scored here, not read from TRL's cache
    # Statistics for the policy's passes only (3 training steps, evaluations at steps 2 and 3),
    # none while precomputing the reference
    assert calls == [("entropy", "mean_logits", "is_top1")] * (3 + 2)
    assert_same_run(expected, actual)
    assert any("eval_entropy" in step for step in actual[0])


def test_peft_lora(tokenizer, monkeypatch):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = dict(kind="llama", with_ref=False, peft_config=peft.LoraConfig(**lora))
    expected = train(trl.DPOTrainer, tokenizer, **config)
    forbid_trl_head(monkeypatch)
    actual = train(fastdpo.trl.DPOTrainer, tokenizer, **config)
    assert_same_run(expected, actual)
    assert any("lora_B" in name and update.abs().max() > 0 for name, update in actual[1].items())


def test_statistics_only_when_trl_reads_them(tokenizer, monkeypatch):
    calls = []
    statistics = fastdpo_lm_head.head_statistics
    monkeypatch.setattr(fastdpo_lm_head, "head_statistics", lambda *a: calls.append(a[-1]) or statistics(*a))
    train(fastdpo.trl.DPOTrainer, tokenizer, use_weighting=True)
    # One call per step, the policy's; the reference's head computes log-probs only.
    assert calls == [("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")] * 3


def test_other_calls_go_to_the_model(tokenizer):
    model = tiny_lm(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model(input_ids=ids).logits
    trainer = train(fastdpo.trl.DPOTrainer, tokenizer, model=model, max_steps=1)[2]
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits.shape, expected.shape)
    assert trainer.model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


class LinearLikeHead(torch.nn.Module):
    """The same projection as nn.Linear, but not one: fastdpo cannot know what its forward does."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def with_linear_like_head(tokenizer):
    model = tiny_lm(tokenizer, "llama")
    model.lm_head = LinearLikeHead(model.lm_head)
    return model


@pytest.mark.parametrize(
    "model, reason",
    [
        ("gemma2", "soft-caps its logits (final_logit_softcapping=5.0)"),
        ("linear_like_head", "the LM head is a LinearLikeHead, not an nn.Linear"),
    ],
)
def test_fallback_is_trls_head_and_warns_once(model, reason, tokenizer):
    build = with_linear_like_head if model == "linear_like_head" else lambda t: tiny_lm(t, model)
    expected = train(trl.DPOTrainer, tokenizer, model=build(tokenizer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train(fastdpo.trl.DPOTrainer, tokenizer, model=build(tokenizer))
    ours = [str(w.message) for w in caught if "fastdpo.trl" in str(w.message)]
    # Once for the policy and once for the reference model, over 3 steps
    assert len(ours) == 2 and all(reason in message for message in ours), ours
    assert_same_run(expected, actual, rtol=0)  # the same code ran


def test_import_without_trl_says_how_to_install():
    code = "import sys; sys.modules['trl'] = None; import fastdpo.trl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: fastdpo.trl needs TRL 1.16, an optional dependency: pip install fastdpo[trl]"
    )


def float64_statistics(hidden, weight, bias, labels):
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    log_p = z.log_softmax(-1)
    return {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == labels,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_statistics_match_float64(dtype, with_bias, monkeypatch):
    # Odd shapes, and tiles of 3 rows and 7 vocabulary columns, so that every loop runs several times
    rows, hidden_size, vocab = 37, 16, 301
    monkeypatch.setattr("fastdpo.trl.statistics.TILE_BYTES", 4 * max(3 * vocab, 7 * hidden_size))
    gen = torch.Generator().manual_seed(0)
    hidden = (2 * torch.randn(rows, hidden_size, generator=gen)).to(dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[:5] = (hidden[:5].float() @ weight.float().T).argmax(-1)  # some labels are the top-1 token
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not lower the products' precision
        got = head_statistics(hidden, weight, bias, labels, STATISTICS)
    truth = float64_statistics(hidden, weight, bias, labels)
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), truth[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(got["is_top1"], truth["is_top1"]) and got["is_top1"][:5].all()
    assert head_statistics(hidden, weight, bias, labels, ("entropy",)).keys() == {"entropy"}
    with pytest.raises(ValueError, match="names must be among"):
        head_statistics(hidden, weight, bias, labels, ("logits",))


def test_is_top1_counts_a_tie_only_for_the_first_token():
    # TRL counts the label as top-1 only when no earlier token has the same logit (argmax's choice)
    weight = torch.tensor([[1.0], [1.0], [0.0]])
    got = head_statistics(torch.ones(2, 1), weight, None, torch.tensor([0, 1]), ("is_top1",))
    assert got["is_top1"].tolist() == [True, False]


def test_torchrun_two_processes_match_one(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl_torchrun import run

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "trl_torchrun.py"),
        str(gpt2_dir),
        str(tmp_path / "ddp"),
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert ddp["num_processes"] == 2

    one = run(str(gpt2_dir), str(tmp_path / "one"), batch_size=4)  # the same global batch
    assert one.accelerator.num_processes == 1
    before = AutoModelForCausalLM.from_pretrained(gpt2_dir).state_dict()
    after_ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    updates = lambda weights: {k: weights[k] - before[k] for k in before}  # noqa: E731
    assert_same_run(
        (one.state.log_history, updates(one.model.state_dict()), one),
        (ddp["log_history"], updates(after_ddp), None),
        ignore=["total_flos"],
    )
    # (Trainer estimates total_flos from the padded batch shapes, which differ per rank.)


@pytest.mark.parametrize("pre_shifted", [False, True])
def test_head_gives_what_trls_head_gives(pre_shifted, tokenizer):
    # Straight at the head: every FusedCausalLMOutput field and the log-probs' gradient, with
    # labels or pre-shifted shift_labels (context parallelism), with num_items_in_batch.
    torch.manual_seed(1)
    ids = torch.randint(0, len(tokenizer), (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_items_in_batch=torch.tensor(17))
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)  # as transformers pre-shifts them
    call |= dict(shift_labels=shifted) if pre_shifted else dict(labels=labels)
    outputs = ("log_probs", *STATISTICS)
    results = []
    for add in (trl_utils.add_fused_lm_head, fastdpo.trl.add_fastdpo_lm_head):
        model = tiny_lm(tokenizer, "phi")
        add(model, outputs=outputs)
        out = model(**call, fused_lm_head=True)
        out.log_probs.pow(2).sum().backward()  # a gradient that differs per token
        results.append((out, {k: p.grad for k, p in model.named_parameters()}))
    (trl_out, trl_grads), (out, grads) = results
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(out, name), getattr(trl_out, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(out.is_top1, trl_out.is_top1) and torch.equal(out.label_mask, trl_out.label_mask)
    assert out.log_probs.shape == ((3, 12) if pre_shifted else (3, 11)) and out.aux_loss is None
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_bf16_mixed_precision_runs_both_heads_under_autocast(tokenizer, monkeypatch):
    # TRL's default bf16=True: accelerate wraps the reference's forward (in TRL's constructor) and
    # the policy's (in train) in bfloat16 autocast; fastdpo's head must run inside those wrappers.
    expected = train(trl.DPOTrainer, tokenizer, bf16=True, max_steps=1)[0][0]
    forbid_trl_head(monkeypatch)
    dtypes = []
    linear_token_logps = fastdpo_lm_head.linear_token_logps
    monkeypatch.setattr(
        fastdpo_lm_head,
        "linear_token_logps",
        lambda hidden, *a, **k: dtypes.append(hidden.dtype) or linear_token_logps(hidden, *a, **k),
    )
    actual = train(fastdpo.trl.DPOTrainer, tokenizer, bf16=True, max_steps=1)[0][0]
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the policy, then the reference
    # TRL rounds its logits to bfloat16, fastdpo keeps the products of bfloat16 operands in float32.
    for key in ("loss", "logps/chosen", "logps/rejected", "entropy"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-2), key


def test_trl_module_is_left_as_it_was(tokenizer):
    import trl.trainer.dpo_trainer as trl_dpo_trainer

    train(fastdpo.trl.DPOTrainer, tokenizer, max_steps=1)
    with pytest.raises(ValueError, match="train_dataset"):  # TRL's own error, from inside the swap
        fastdpo.trl.DPOTrainer(model=tiny_lm(tokenizer), args=trl.DPOConfig("unused", use_cpu=True))
    assert trl_dpo_trainer.add_fused_lm_head is trl_utils.add_fused_lm_head
    # and a plain TRL trainer built afterwards runs TRL's own head
    model = train(trl.DPOTrainer, tokenizer, max_steps=1)[2].model
    assert model.forward.__func__.__code__.co_filename == trl_utils.__file__


def test_fallback_reasons(tokenizer, monkeypatch):
    from fastdpo.trl.lm_head import fallback_reason

    model = tiny_lm(tokenizer)
    assert fallback_reason(model, {}) is None
    assert fallback_reason(model, {}, temperature=0.7) == "TRL's head divides the logits by temperature=0.7"
    assert "Mixture-of-Experts" in fallback_reason(model, {"output_router_logits": True})
    cases = {  # config attribute -> the factor TRL's head would apply
        "logit_scale": (0.25, "0.25"),
        "output_multiplier": (2.0, "2.0"),
        "lm_head_multiplier": (3.0, "3.0"),
        "logits_scaling": (4.0, "0.25"),
    }
    for name, (value, factor) in cases.items():
        monkeypatch.setattr(model.config, name, value, raising=False)
        assert fallback_reason(model, {}) == f"the model scales its logits by {factor}", name
        monkeypatch.undo()
    monkeypatch.setattr(model.config, "logit_scale", 1.0, raising=False)  # TRL's head: unscaled
    assert fallback_reason(model, {}) is None
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(300, 32, dtype=torch.int8), requires_grad=False)
    assert "not a float matrix" in fallback_reason(model, {})
