"""Test set-up. Triton runs through its CPU interpreter here: the variable must be set
before anything imports triton, so it is set at collection time when there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (tied LM head) and tokenizer saved with save_pretrained."""
    from lm_helpers import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny Llama (untied LM head) and tokenizer saved with save_pretrained."""
    from lm_helpers import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    from lm_helpers import PAIRS, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)
