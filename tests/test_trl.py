"""fastdpo.trl.DPOTrainer against TRL 1.16's own DPOTrainer: same logged metrics and weights in
float32 while TRL's fused head never runs; fallbacks; PEFT; precomputed references; torchrun."""

import copy
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
    record_statistics_requests(monkeypatch, calls)
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
    # none while precomputing the reference (which comes first)
    assert calls[-5:] == [True] * (3 + 2) and calls[:-5] and not any(calls[:-5])
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


def record_statistics_requests(monkeypatch, calls: list) -> None:
    """Record the ``statistics`` flag of every fused linear pass fastdpo's head makes."""
    fused = fastdpo_lm_head.fused_linear_logps
    monkeypatch.setattr(
        fastdpo_lm_head, "fused_linear_logps", lambda *a, **k: calls.append(k["statistics"]) or fused(*a, **k)
    )


def test_statistics_only_when_trl_reads_them(tokenizer, monkeypatch):
    calls = []
    record_statistics_requests(monkeypatch, calls)
    train(fastdpo.trl.DPOTrainer, tokenizer, use_weighting=True)
    # Two passes per step; the policy's asks for statistics, the reference's computes log-probs only.
    assert len(calls) == 6 and calls.count(True) == 3


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
def test_head_statistics_match_float64_under_autocast(dtype, with_bias):
    # What the head hands TRL: the statistics of the fused linear pass (odd shapes), whose float32
    # products an enclosing bfloat16 autocast region must not lower.
    rows, hidden_size, vocab = 37, 16, 301
    gen = torch.Generator().manual_seed(0)
    hidden = (2 * torch.randn(rows, hidden_size, generator=gen)).to(dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[:5] = (hidden[:5].float() @ weight.float().T).argmax(-1)  # some labels are the top-1 token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastdpo_lm_head.fused_linear_logps(
            hidden[None], weight, labels[None], bias=bias, shift=False, statistics=True
        )
    truth = float64_statistics(hidden, weight, bias, labels)
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        value = getattr(got.statistics, name)[0]
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), truth[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(got.statistics.is_top1[0], truth["is_top1"]) and got.statistics.is_top1[0, :5].all()


def test_is_top1_counts_a_tie_only_for_the_first_token():
    # TRL counts the label as top-1 only when no earlier token has the same logit (argmax's choice)
    weight = torch.tensor([[1.0], [1.0], [0.0]])
    labels = torch.tensor([[0, 1]])
    got = fastdpo_lm_head.fused_linear_logps(
        torch.ones(1, 2, 1), weight, labels, shift=False, statistics=True
    )
    assert got.statistics.is_top1.tolist() == [[True, False]]
