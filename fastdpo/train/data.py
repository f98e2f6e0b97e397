"""Preference data: loading, tokenisation and collation for :class:`fastdpo.DPOTrainer`.

A record is ``{"prompt", "chosen", "rejected"}`` with either

- strings (the completion follows the prompt text directly), or
- lists of chat messages ``{"role", "content"}`` (TRL's conversational form), rendered with the
  tokenizer's chat template when it has one (else ``"role: content"`` lines). ``prompt`` may be
  left out when ``chosen`` and ``rejected`` are whole conversations that share their opening
  messages: those become the prompt.

Records come from a JSONL file, or any iterable of dicts (a ``datasets.Dataset`` works).
A line that is not UTF-8 or not valid JSON is an error naming the file and line. A record with a
missing or mistyped field, an empty completion, or a prompt that leaves no room for the completion within
``max_length`` is skipped and counted (``PreferenceData.skipped``; the trainer prints the counts),
or, with ``strict=True``, is an error naming where it came from.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
FIELDS = ("prompt", "chosen", "rejected")


class BadRecord(ValueError):
    """A record that cannot be used; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens only, EOS appended
    rejected_ids: list[int]
    source: str = ""  # "file.jsonl:12" or "record 12", for messages
    truncated: bool = False  # shortened to fit max_prompt_length / max_length
    merged: bool = False  # the end of the prompt and the completion tokenise together (see tokenize_record)


@dataclass
class PreferenceData:
    """Tokenised pairs plus what was skipped (reason -> count, and where, first few per reason)."""

    pairs: list[TokenizedPair]
    skipped: Counter = field(default_factory=Counter)
    skipped_where: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0  # pairs kept but shortened to fit max_prompt_length / max_length
    merged: int = 0  # pairs whose prompt end and completion share a token

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        """One line: how many pairs were kept, truncated, and skipped for which reason."""
        text = f"{len(self.pairs)} pairs"
        if self.truncated:
            text += f", {self.truncated} truncated to fit"
        if self.merged:
            text += (
                f", {self.merged} with a token across the prompt/completion boundary (scored as completion)"
            )
        if self.skipped:
            parts = []
            for reason, count in self.skipped.most_common():
                where = self.skipped_where.get(reason, [])
                more = ", ..." if count > len(where) else ""
                parts.append(f"{count} {reason} ({', '.join(where)}{more})")
            text += f"; skipped {sum(self.skipped.values())}: " + "; ".join(parts)
        return text


def read_jsonl(path: str | os.PathLike) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, record)`` for each non-blank line; a line that is not UTF-8 or not JSON
    raises naming file and line."""
    with open(path, "rb") as f:  # issue 13 (trust): bytes, decoded per line, so an error can name the line
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield where, record


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _split_conversations(record: dict) -> dict:
    """TRL's implicit-prompt form: the shared opening messages of chosen and rejected are the prompt."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" in record or not (_is_messages(chosen) and _is_messages(rejected)):
        return record
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _render_messages(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def record_texts(record: Any, tokenizer) -> tuple[str, str, str, bool]:
    """``(prompt_text, chosen_text, rejected_text, templated)`` of one record, or :class:`BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(record).__name__}")
    record = _split_conversations(record)
    for name in FIELDS:
        if name not in record or record[name] is None:
            raise BadRecord(f"missing '{name}'", f"the record has no '{name}' field")
    values = [record[name] for name in FIELDS]
    if all(isinstance(v, str) for v in values):
        prompt, chosen, rejected = values
        templated = False
    elif all(_is_messages(v) for v in values):
        prompt_msgs, chosen_msgs, rejected_msgs = values
        if not chosen_msgs or not rejected_msgs:
            raise BadRecord("empty completion", "'chosen' or 'rejected' has no messages")
        prompt = _render_messages(tokenizer, prompt_msgs, generation_prompt=True)
        full_c = _render_messages(tokenizer, prompt_msgs + chosen_msgs, generation_prompt=False)
        full_r = _render_messages(tokenizer, prompt_msgs + rejected_msgs, generation_prompt=False)
        # The completion is what the full conversation adds to the rendered prompt. A template that
        # renders the prompt differently on its own shortens the prompt to the shared text.
        cut = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
        prompt, chosen, rejected = prompt[:cut], full_c[cut:], full_r[cut:]
        templated = True
    else:
        kinds = {name: type(v).__name__ for name, v in zip(FIELDS, values)}
        raise BadRecord(
            "wrong field types",
            f"prompt/chosen/rejected must all be strings or all be lists of messages, got {kinds}",
        )
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRecord("empty completion", f"'{name}' is empty")
    return prompt, chosen, rejected, templated


def tokenize_record(
    record: Any,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None,
    source: str = "",
) -> TokenizedPair:
    """Tokenise one record.

    As in TRL, prompt + completion is tokenised as one text and the completion is what follows the
    tokenised prompt (the longest common prefix with the prompt tokenised alone, shared by chosen
    and rejected), so tokenizers that mark word starts (SentencePiece's ``▁``) or merge across the
    boundary see the text they would see at inference. EOS is appended to each completion unless it
    already ends with it. The prompt keeps its last ``max_prompt_length`` tokens; a completion keeps
    its first ``max_length - len(prompt)`` tokens. A prompt that leaves no room is a :class:`BadRecord`.
    """
    prompt, chosen, rejected, templated = record_texts(record, tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) before training"
        )

    def encode(text: str) -> list[int]:  # a chat template writes its own special tokens (BOS...)
        return tokenizer(text, add_special_tokens=not templated)["input_ids"]

    prompt_ids, full = encode(prompt), [encode(prompt + chosen), encode(prompt + rejected)]
    shared = min(_common_prefix(prompt_ids, ids) for ids in full)
    merged = shared < len(prompt_ids)  # the prompt's last tokens are scored with the completion
    prompt_ids = prompt_ids[:shared]
    completions = [ids[shared:] for ids in full]
    completions = [ids if ids and ids[-1] == eos else ids + [eos] for ids in completions]
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[len(prompt_ids) - max_prompt_length :], True
    room = max_length - len(prompt_ids)
    if room < 1:
        raise BadRecord(
            "prompt too long",
            f"the prompt has {len(prompt_ids)} tokens, which leaves no room in max_length={max_length} "
            "(set max_prompt_length below max_length to truncate prompts instead)",
        )
    if any(len(ids) > room for ids in completions):
        completions, truncated = [ids[:room] for ids in completions], True
    return TokenizedPair(prompt_ids, completions[0], completions[1], source, truncated, merged)


def load_preference_data(
    data: str | os.PathLike | Iterable[dict],
    tokenizer,
    *,
    max_length: int = 512,
    max_prompt_length: int | None = 256,
    strict: bool = False,
) -> PreferenceData:
    """Tokenise every record of a JSONL path or an iterable of dicts (see the module docstring)."""
    if isinstance(data, PreferenceData):
        return data
    if isinstance(data, (str, os.PathLike)):
        records = read_jsonl(data)
    else:
        records = ((f"record {i}", r) for i, r in enumerate(data))
    out = PreferenceData(pairs=[])
    for where, record in records:
        try:
            pair = tokenize_record(
                record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, source=where
            )
        except BadRecord as e:
            if strict:
                raise ValueError(f"{where}: {e}") from None
            out.skipped[e.reason] += 1
            listed = out.skipped_where.setdefault(e.reason, [])
            if len(listed) < 3:
                listed.append(where)
            continue
        out.pairs.append(pair)
        out.truncated += pair.truncated
        out.merged += pair.merged
    if not out.pairs:
        raise ValueError(f"no usable preference pairs in {data!s:.200}: {out.summary()}")
    return out


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS when it has none (padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``[2B, T]`` ``input_ids``, ``attention_mask`` and ``labels`` for ``B`` pairs.

    Rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected (TRL's layout), padded on
    the right to the longest row. ``labels`` are the input ids with prompt and padding set to -100
    (the causal shift happens in the loss).
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        labels[i, n : n + m] = torch.tensor(completion, dtype=torch.long)
        attention_mask[i, : n + m] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
