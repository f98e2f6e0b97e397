"""Preference data: tokenisation, masking, truncation, chat templates, bad records."""

import json

import pytest
import torch
from lm_helpers import PAIRS, build_tokenizer, write_jsonl

from fastdpo.train.data import collate, load_preference_data, tokenize_record


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_masks_prompt_and_appends_eos(tokenizer):
    data = load_preference_data(PAIRS[:2], tokenizer, max_length=64, max_prompt_length=32)
    batch = collate(data.pairs, pad_token_id=tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    assert batch["input_ids"].shape[0] == 4  # [chosen 0, chosen 1, rejected 0, rejected 1]
    for row, (pair, which) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        prompt, completion = ids(tokenizer, PAIRS[pair]["prompt"]), ids(tokenizer, PAIRS[pair][which])
        n, m = len(prompt), len(completion) + 1
        assert batch["input_ids"][row, : n + m].tolist() == prompt + completion + [eos]
        assert batch["labels"][row, :n].eq(-100).all(), "prompt tokens must not be scored"
        assert batch["labels"][row, n : n + m].tolist() == completion + [eos]
        assert batch["labels"][row, n + m :].eq(-100).all(), "padding must not be scored"
        assert batch["attention_mask"][row].tolist() == [1] * (n + m) + [0] * (
            batch["input_ids"].shape[1] - n - m
        )
        assert batch["input_ids"][row, n + m :].eq(tokenizer.pad_token_id).all()
    # chosen and rejected of one pair share exactly the same prompt tokens
    assert data.pairs[0].prompt_ids == ids(tokenizer, PAIRS[0]["prompt"])


def test_eos_is_not_doubled(tokenizer):
    record = {"prompt": "The cat", "chosen": " sat.<|endoftext|>", "rejected": " ran."}
    pair = tokenize_record(record, tokenizer, max_length=64, max_prompt_length=32)
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert pair.rejected_ids[-1] == tokenizer.eos_token_id


def test_prompt_is_truncated_from_the_left_and_completion_from_the_right(tokenizer):
    prompt = " ".join(["The cat sat on the mat."] * 6)
    record = {"prompt": prompt, "chosen": " and then " * 10, "rejected": " purred."}
    full_prompt = ids(tokenizer, prompt)
    data = load_preference_data([record], tokenizer, max_length=24, max_prompt_length=10)
    pair = data.pairs[0]
    assert pair.prompt_ids == full_prompt[-10:], "the end of the prompt is kept"
    assert pair.chosen_ids == (ids(tokenizer, record["chosen"]) + [tokenizer.eos_token_id])[:14]
    assert pair.rejected_ids == ids(tokenizer, " purred.") + [tokenizer.eos_token_id]
    assert data.truncated == 1 and "1 truncated" in data.summary()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_conversational_records_use_the_chat_template(tokenizer):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = [{"role": "user", "content": "Where did the cat sit?"}]
    explicit = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "On the bed, barking."}],
        "rejected": [{"role": "assistant", "content": "On the mat."}],
    }
    implicit = {"chosen": prompt + explicit["chosen"], "rejected": prompt + explicit["rejected"]}
    a = tokenize_record(explicit, tokenizer, max_length=128, max_prompt_length=64)
    b = tokenize_record(implicit, tokenizer, max_length=128, max_prompt_length=64)
    assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
    assert tokenizer.decode(a.prompt_ids) == "<|user|>Where did the cat sit?<|endoftext|><|assistant|>"
    # the template ends the turn with EOS itself, so no second EOS is appended
    assert tokenizer.decode(a.chosen_ids) == "On the bed, barking.<|endoftext|>"
    assert tokenizer.decode(a.rejected_ids) == "On the mat.<|endoftext|>"


def test_conversational_records_without_a_template_render_role_lines(tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away"}],
    }
    pair = tokenize_record(record, tokenizer, max_length=64, max_prompt_length=32)
    assert tokenizer.decode(pair.prompt_ids) == "user: Hi\nassistant: "
    assert tokenizer.decode(pair.chosen_ids) == "Hello\n<|endoftext|>"


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n' + json.dumps(PAIRS[1]) + "\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        load_preference_data(path, tokenizer)


def test_bad_records_are_skipped_and_counted(tmp_path, tokenizer):
    records = [
        PAIRS[0],
        {"prompt": "x", "chosen": " y"},  # line 2: no rejected
        {"prompt": "x", "chosen": "", "rejected": " z"},  # line 3: empty completion
        {"prompt": "The cat sat on the mat. " * 8, "chosen": " y", "rejected": " z"},  # line 4: too long
        {"prompt": "x", "chosen": 3, "rejected": " z"},  # line 5: wrong type
        [1, 2],  # line 6: not an object
        PAIRS[1],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    data = load_preference_data(path, tokenizer, max_length=24, max_prompt_length=None)
    assert len(data) == 2
    assert dict(data.skipped) == {
        "missing 'rejected'": 1,
        "empty completion": 1,
        "prompt too long": 1,
        "wrong field types": 1,
        "not an object": 1,
    }
    summary = data.summary()
    assert "skipped 5" in summary and f"{path}:2" in summary and f"{path}:4" in summary
    with pytest.raises(ValueError, match=rf"{path}:2: the record has no 'rejected' field"):
        load_preference_data(path, tokenizer, max_length=24, max_prompt_length=None, strict=True)


def test_no_usable_record_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no usable preference pairs.*missing 'chosen'"):
        load_preference_data([{"prompt": "x", "rejected": "y"}], tokenizer)


def test_datasets_dataset_is_accepted(tokenizer):
    from datasets import Dataset

    data = load_preference_data(Dataset.from_list(PAIRS), tokenizer, max_length=64, max_prompt_length=32)
    direct = load_preference_data(PAIRS, tokenizer, max_length=64, max_prompt_length=32)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.pairs] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in direct.pairs
    ]
    assert data.pairs[3].source == "record 3"


def test_collate_pads_to_the_longest_row(tokenizer):
    data = load_preference_data(PAIRS, tokenizer, max_length=64, max_prompt_length=32)
    batch = collate(data.pairs, pad_token_id=0)
    lengths = [len(p.prompt_ids) + len(c) for p in data.pairs for c in (p.chosen_ids,)]
    lengths += [len(p.prompt_ids) + len(p.rejected_ids) for p in data.pairs]
    assert batch["input_ids"].shape == (2 * len(PAIRS), max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].dtype == torch.long


def sentencepiece_style_tokenizer():
    """Word starts marked with ``▁`` and one prepended to the text, like Llama-2's tokenizer: on its
    own, " mat" becomes ``▁ ▁mat``; after "on the" it is ``▁mat``."""
    from lm_helpers import TEXT
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    core.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")


def test_completion_is_tokenised_in_the_context_of_its_prompt():
    tokenizer = sentencepiece_style_tokenizer()
    record = {"prompt": "The cat sat on the", "chosen": " mat and purred.", "rejected": " door and barked."}
    pair = tokenize_record(record, tokenizer, max_length=64, max_prompt_length=32)
    for completion, ids in ((record["chosen"], pair.chosen_ids), (record["rejected"], pair.rejected_ids)):
        joint = tokenizer(record["prompt"] + completion)["input_ids"]
        assert pair.prompt_ids + ids == joint + [tokenizer.eos_token_id]
        # tokenised on its own, the completion would start with a spurious word-start marker
        assert ids[:-1] != tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert not pair.merged


def test_a_token_across_the_prompt_boundary_is_counted(tokenizer):
    # "... on t" + "he mat" tokenises as "the": the prompt's last token goes to the completions
    record = {"prompt": "The cat sat on t", "chosen": "he mat and purred.", "rejected": "ree and barked."}
    data = load_preference_data([record], tokenizer, max_length=64, max_prompt_length=32)
    pair = data.pairs[0]
    assert pair.merged and data.merged == 1 and "across the prompt/completion boundary" in data.summary()
    assert tokenizer.decode(pair.prompt_ids) == "The cat sat on"
    assert tokenizer.decode(pair.chosen_ids) == " the mat and purred.<|endoftext|>"
    assert tokenizer.decode(pair.rejected_ids) == " tree and barked.<|endoftext|>"
