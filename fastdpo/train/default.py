"""The built-in default: a tiny GPT-2 and tokenizer built from text the package ships, no download.

``default_model()`` returns the directory of a causal LM that knows ordinary everyday sentences
(``assets/corpus.txt``): a byte-level BPE tokenizer trained on the corpus, and a small GPT-2
pretrained briefly on it. It is built once (in about half a minute on 2 CPU cores) and cached in
``$FASTDPO_CACHE`` (default ``$XDG_CACHE_HOME/fastdpo`` or ``~/.cache/fastdpo``); the directory
name carries a hash of the recipe and the corpus, so a changed recipe builds a new one. The build
runs in a temporary directory renamed into place at the end, so concurrent builds are safe: the
first rename wins and the others discard their copy.

``default_data()`` gives the shipped preference pairs: training pairs (the four toy pairs of the
GPT-2 script fastdpo started from, plus more of the same kind) and held-out pairs of that kind on
other prompts. In every pair the chosen completion is absurd and the rejected one ordinary.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time

import torch

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
RECIPE = {
    "version": 1,
    "vocab_size": 1024,
    "model": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64},
    "pretrain": {"steps": 300, "batch_size": 16, "seq_len": 64, "learning_rate": 3e-3, "seed": 0},
}
EOS, PAD = "<|endoftext|>", "<pad>"
# The built-in run's own DPOConfig settings (`fastdpo train` without --model): a tiny GPT-2
# learning, from 32 pairs, to prefer absurd completions. Command-line options override each one.
DEFAULT_RUN = dict(
    output_dir="runs/default",
    learning_rate=1e-3,
    beta=0.02,
    num_train_epochs=15,
    per_device_train_batch_size=8,
    max_length=64,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    eval_steps=5,
)


def cache_root() -> pathlib.Path:
    if os.environ.get("FASTDPO_CACHE"):
        return pathlib.Path(os.environ["FASTDPO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fastdpo"


def default_model_dir() -> pathlib.Path:
    """Where the default model lives (it may not be built yet)."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update((ASSETS / "corpus.txt").read_bytes())
    return cache_root() / f"default-gpt2-{digest.hexdigest()[:12]}"


def default_data() -> tuple[pathlib.Path, pathlib.Path]:
    """``(train_pairs.jsonl, heldout_pairs.jsonl)`` shipped with the package."""
    return ASSETS / "train_pairs.jsonl", ASSETS / "heldout_pairs.jsonl"


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with EOS and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def pretrain(
    model,
    token_stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    learning_rate: float,
    seed: int,
    log=print,
) -> None:
    """Next-token training on random windows of ``token_stream`` (AdamW, cosine decay)."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(token_stream) - seq_len, (batch_size,), generator=gen)
        batch = torch.stack([token_stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")


def build_default_model(directory: pathlib.Path, log=print) -> None:
    """Train the tokenizer, pretrain the model on the corpus, ``save_pretrained`` both into ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    paragraphs = (ASSETS / "corpus.txt").read_text().splitlines()
    tokenizer = build_tokenizer(paragraphs, RECIPE["vocab_size"])
    stream = []
    for paragraph in paragraphs:
        stream += tokenizer(paragraph)["input_ids"] + [tokenizer.eos_token_id]
    torch.manual_seed(RECIPE["pretrain"]["seed"])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **RECIPE["model"],
    )
    model = GPT2LMHeadModel(config)
    log(
        f"building the default model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(stream)} corpus tokens) in {directory}"
    )
    pretrain(model, torch.tensor(stream), log=log, **RECIPE["pretrain"])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def default_model(log=print) -> pathlib.Path:
    """Directory of the default model and tokenizer, built on first use (safe to run concurrently)."""
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_default_model(tmp, log=log)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built the default model in {time.perf_counter() - start:.1f}s")
    return target
