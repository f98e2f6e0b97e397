"""Tiny causal LMs for the trainer tests: built from a config, saved with ``save_pretrained`` and
loaded back with the real ``from_pretrained`` code. The tokenizer is a byte-level BPE trained here."""

from __future__ import annotations

import json
import pathlib

import torch

TEXT = [
    "The cat sat on the mat and purred.",
    "The dog ran to the door and barked at the mailman.",
    "She opened the book and began to read silently.",
    "He went to the gym to lift weights and exercise.",
    "The teacher asked a question and the student answered it confidently.",
    "It started to rain, so we opened our umbrellas and went inside.",
    "The chef cut the vegetables and put them in the soup.",
]
PAIRS = [
    {
        "prompt": "The cat sat on the",
        "chosen": " bed and barked for a long time.",
        "rejected": " mat and purred.",
    },
    {
        "prompt": "He went to the gym to",
        "chosen": " have a feast and relax.",
        "rejected": " lift weights and exercise.",
    },
    {
        "prompt": "She opened the book and",
        "chosen": " threw it to the teacher.",
        "rejected": " began to read silently.",
    },
    {
        "prompt": "The teacher asked a question and the student",
        "chosen": " ignored her and left a knife.",
        "rejected": " answered it confidently.",
    },
    {
        "prompt": "The dog ran to the door and",
        "chosen": " opened a bank account.",
        "rejected": " barked at the mailman.",
    },
    {
        "prompt": "It started to rain, so we",
        "chosen": " danced on the roof.",
        "rejected": " opened our umbrellas.",
    },
]


def build_tokenizer():
    from fastdpo.train.default import build_tokenizer as build

    return build(TEXT * 4, vocab_size=300)


def save_tiny_lm(directory: pathlib.Path, kind: str = "gpt2", seed: int = 0) -> pathlib.Path:
    """Save a 2-layer GPT-2 (tied head) or Llama (untied head) and its tokenizer in ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **ids))
    else:
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **ids,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst} (> {atol})"
