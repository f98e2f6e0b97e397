"""Checkpoints that cannot run code, that are verified before use, and whose damage is named
(issue 13, items 1, 4 and 6)."""

import json
import os
import random

import numpy as np
import pytest
import torch
from lm_helpers import assert_same_weights, weights
from run_helpers import flip_byte, killed_run, make_trainer

from fastdpo.train import checkpoint as ckpt

RUN = dict(max_steps=4, per_device_train_batch_size=2, save_steps=2)


@pytest.fixture(scope="module")
def finished_run(gpt2_dir, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("finished")
    trainer = make_trainer(gpt2_dir, out, **RUN)
    trainer.train()
    return out, weights(trainer.model)


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target, symlinks=True)
    (target / ".fastdpo.lock").unlink(missing_ok=True)
    return target


class Payload:
    """What a tampered checkpoint would hold: unpickling it calls ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def rewrite_manifest(directory):
    """What someone who tampers with a checkpoint would do as well: make the digests match again."""
    try:
        from fastdpo.train import manifest
    except ImportError:  # a fastdpo without manifests has nothing to rewrite
        return
    (directory / manifest.MANIFEST).unlink()
    manifest.write_manifest(directory)


# ----------------------------------------------------------------------------- item 1: no code from checkpoints
def test_trainer_state_loads_as_weights_only(finished_run):
    out, _ = finished_run
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert state["rng"]["python"]["keys"].dtype == torch.int64


def test_rng_states_round_trip_through_tensors():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leaves cached Gaussians in both states
    saved = ckpt.rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(saved)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert expected[:2] == again[:2]
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_a_pickled_payload_is_refused_and_never_runs(finished_run, gpt2_dir, tmp_path):
    out = copy_run(finished_run[0], tmp_path / "run")
    marker = tmp_path / "payload-ran"
    checkpoint = out / "checkpoint-4"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    torch.save({**state, "evaluations": [Payload(marker)]}, checkpoint / "trainer_state.pt")
    rewrite_manifest(checkpoint)

    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state\.pt: refused to load"):
        ckpt.load_state(checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state\.pt: refused to load"):
        make_trainer(gpt2_dir, out, **RUN).train(resume_from_checkpoint=checkpoint)
    assert not marker.exists()


# ----------------------------------------------------------------------------- item 4: verified, named, fallback
def test_corrupted_weights_are_named_and_the_resume_falls_back(finished_run, gpt2_dir, tmp_path, capsys):
    out = copy_run(finished_run[0], tmp_path / "run")
    flip_byte(out / "checkpoint-4" / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-4/model\.safetensors: sha256 differs"):
        make_trainer(gpt2_dir, out, **RUN).train(resume_from_checkpoint=out / "checkpoint-4")

    capsys.readouterr()
    resumed = make_trainer(gpt2_dir, out, **RUN)
    resumed.train(resume_from_checkpoint=True)
    err = capsys.readouterr().err
    unusable = err.index("checkpoint-4 is unusable: ")
    assert "model.safetensors: sha256 differs" in err[unusable:] and "falling back to checkpoint-2" in err
    assert err.index(f"resuming from {out / 'checkpoint-2'} (step 2)") > unusable  # why first, then where
    assert_same_weights(finished_run[1], weights(resumed.model))  # steps 3-4 redone from checkpoint-2
    ckpt.manifest.verify(out / "checkpoint-4")  # rewritten whole


def test_corrupted_trainer_state_is_named(finished_run, gpt2_dir, tmp_path):
    out = copy_run(finished_run[0], tmp_path / "run")
    flip_byte(out / "checkpoint-2" / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"checkpoint-2/trainer_state\.pt: sha256 differs"):
        make_trainer(gpt2_dir, out, **RUN).train(resume_from_checkpoint=out / "checkpoint-2")


def test_no_usable_checkpoint_says_why_for_each(finished_run, gpt2_dir, tmp_path):
    out = copy_run(finished_run[0], tmp_path / "run")
    flip_byte(out / "checkpoint-2" / "model.safetensors")
    (out / "checkpoint-4" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError) as error:
        make_trainer(gpt2_dir, out, **RUN).train(resume_from_checkpoint=True)
    message = str(error.value)
    assert "no usable checkpoint" in message and "\n" not in message
    assert "checkpoint-4/trainer_state.pt: 0 bytes" in message and "checkpoint-2/model.safetensors" in message


def test_resume_without_any_checkpoint_names_the_directory(gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no checkpoint"):
        make_trainer(gpt2_dir, tmp_path / "empty", **RUN).train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- item 6: damaged files are named
@pytest.mark.parametrize("damage", ["empty", "truncated", "not a checkpoint"])
def test_an_unreadable_trainer_state_is_named(finished_run, tmp_path, damage):
    checkpoint = copy_run(finished_run[0], tmp_path / "run") / "checkpoint-2"
    path = checkpoint / "trainer_state.pt"
    content = {"empty": b"", "truncated": path.read_bytes()[:1000], "not a checkpoint": b"hello"}[damage]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}: unreadable trainer state") as error:
        ckpt.load_state(checkpoint)
    assert "\n" not in str(error.value)


def test_a_state_without_the_trainer_keys_is_named(tmp_path):
    torch.save({"step": 1}, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt: not a fastdpo trainer state \(no optimizer"):
        ckpt.load_state(tmp_path)


def test_a_torn_metrics_line_does_not_block_resume(gpt2_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    killed_run(gpt2_dir, out, monkeypatch, at_step=3, **RUN)
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:  # killed in the middle of writing step 4's line
        f.write('{"loss": 0.69, "rewards/chosen": 0.0')
    torn_line = len(metrics.read_text().splitlines())
    capsys.readouterr()
    make_trainer(gpt2_dir, out, **RUN).train(resume_from_checkpoint=True)
    assert f"{metrics}:{torn_line}: dropped a torn last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{metrics}:2: not a JSON object"):
        ckpt.truncate_metrics(metrics, 2)
