"""Nothing fastdpo did not write is deleted or overwritten, and one run at a time writes into an
output directory (issue 13, items 2 and 3)."""

import json
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
from run_helpers import make_trainer

from fastdpo.train import checkpoint as ckpt
from fastdpo.train.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--max-length", "64", "--max-prompt-length", "32", "--no-progress", "--lr", "1e-2", "--no-plot"]


def train_args(gpt2_dir, pairs_file, out, *extra):
    return [
        "train",
        "--model",
        str(gpt2_dir),
        "--data",
        str(pairs_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "3",
        *FAST,
        *extra,
    ]


def users_files(out, final=True):
    """A user's files in an output directory, some named like fastdpo's outputs."""
    out.mkdir(parents=True)
    if final:
        (out / "final").mkdir()
        (out / "final" / "thesis.tex").write_text("\\chapter{One}")
    (out / "checkpoint-drafts").mkdir()
    (out / "checkpoint-drafts" / "draft.md").write_text("draft")
    (out / "checkpoint-notes.txt").write_text("notes")
    return {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()}


def same_files(out, files):
    return all((out / name).read_text() == text for name, text in files.items())


# ----------------------------------------------------------------------------- item 2: ownership
def test_foreign_files_refuse_the_run_and_survive(gpt2_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    files = users_files(out)
    assert main(train_args(gpt2_dir, pairs_file, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdpo: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for name in ("final/ (thesis.tex)", "checkpoint-drafts/ (draft.md)", "checkpoint-notes.txt"):
        assert name in err
    assert same_files(out, files)
    # even with --overwrite-output-dir, final/ is where fastdpo writes: refused, and kept
    assert main(train_args(gpt2_dir, pairs_file, out, "--overwrite-output-dir")) == 2
    assert "final/ (thesis.tex): where fastdpo writes its outputs" in capsys.readouterr().err
    assert same_files(out, files)


def test_overwrite_output_dir_writes_next_to_foreign_files(gpt2_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    files = users_files(out, final=False)
    for _ in range(2):  # a second run replaces the first one's outputs, and only those
        assert main(train_args(gpt2_dir, pairs_file, out, "--overwrite-output-dir")) == 0
        assert same_files(out, files) and (out / "final" / "config.json").is_file()
    assert sorted(json.loads((out / ".fastdpo-run").read_text())["files"]) == ["metrics.jsonl"]


def test_a_new_run_replaces_only_what_fastdpo_wrote(gpt2_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(gpt2_dir, pairs_file, out, "--save-steps", "1")) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert main(train_args(gpt2_dir, pairs_file, out)) == 0  # re-running keeps working
    assert (
        "removed what an earlier run wrote there (checkpoint-1/, checkpoint-2/, final/"
        in capsys.readouterr().err
    )
    assert not (out / "checkpoint-1").exists() and (out / "checkpoint-2").is_dir()  # written again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]  # this run's evaluation before training, steps, evaluation after
    (out / "checkpoint-2" / "my-notes.txt").write_text("mine")  # a user's file inside fastdpo's checkpoint
    assert main(train_args(gpt2_dir, pairs_file, out)) == 2
    assert "checkpoint-2/my-notes.txt" in capsys.readouterr().err
    assert (out / "checkpoint-2" / "my-notes.txt").read_text() == "mine"


def test_a_symlink_named_like_a_checkpoint_is_checked_before_anything_is_deleted(
    gpt2_dir, pairs_file, tmp_path, capsys
):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert main(train_args(gpt2_dir, pairs_file, out)) == 0
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("keep")
    (out / "checkpoint-7").symlink_to(elsewhere, target_is_directory=True)
    (out / "checkpoint-other").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in out.iterdir())
    assert main(train_args(gpt2_dir, pairs_file, out, "--overwrite-output-dir")) == 2
    assert "checkpoint-7 (symbolic link)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier run's outputs too: nothing went
    (out / "checkpoint-7").unlink()
    assert main(train_args(gpt2_dir, pairs_file, out, "--overwrite-output-dir")) == 0
    assert (out / "checkpoint-other").is_symlink() and (elsewhere / "data.txt").read_text() == "keep"


def test_the_trainer_keeps_the_same_rules(gpt2_dir, tmp_path):
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "a.txt").write_text("mine")
    trainer = make_trainer(gpt2_dir, out, max_steps=1, per_device_train_batch_size=3)
    with pytest.raises(ValueError, match=r"holds files fastdpo did not write: notes/ \(a\.txt\)"):
        trainer.evaluate()  # its first write, the metrics line
    with pytest.raises(ValueError, match="overwrite_output_dir=True"):
        trainer.train()
    trainer = make_trainer(
        gpt2_dir, out, max_steps=1, per_device_train_batch_size=3, overwrite_output_dir=True
    )
    trainer.train()
    assert (out / "notes" / "a.txt").read_text() == "mine" and (out / "checkpoint-1").is_dir()


def test_saving_never_replaces_a_directory_fastdpo_did_not_write(gpt2_dir, tmp_path):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "README.md").write_text("mine")
    trainer = make_trainer(gpt2_dir, tmp_path / "run", max_steps=1)
    with pytest.raises(
        FileExistsError, match=r"my-model: exists and holds what fastdpo did not write \(my-model/"
    ):
        trainer.save(mine)
    assert (mine / "README.md").read_text() == "mine"
    trainer.save(tmp_path / "saved")
    trainer.save(tmp_path / "saved")  # its own: replaced
    ckpt.manifest.verify(tmp_path / "saved")


def test_evaluate_then_train_keeps_this_runs_first_metrics_line(gpt2_dir, tmp_path):
    out = tmp_path / "run"
    make_trainer(gpt2_dir, out, max_steps=2, per_device_train_batch_size=3).train()
    trainer = make_trainer(gpt2_dir, out, max_steps=1, per_device_train_batch_size=3)
    trainer.evaluate()
    trainer.train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1] and not (out / "checkpoint-2").exists()


# ----------------------------------------------------------------------------- item 3: the lock
HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from fastdpo.train import run_lock
with run_lock.hold({out!r}):
    print("held", flush=True)
    time.sleep(120)
"""


def holder_process(out):
    """Another process that holds ``out``'s lock (until killed)."""
    code = HOLD.format(out=str(out), repo=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_fails_at_once_naming_the_holder(gpt2_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "fastdpo", *train_args(gpt2_dir, pairs_file, out, "--max-steps", "100000")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        start = time.monotonic()
        assert main(train_args(gpt2_dir, pairs_file, out)) == 2
        assert time.monotonic() - start < 5  # refused before loading anything
        err = capsys.readouterr().err
        assert f"is in use by another fastdpo run: pid {first.pid} on host {socket.gethostname()}" in err
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
    from fastdpo.train import run_lock

    holder = holder_process(tmp_path)
    with pytest.raises(ValueError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
        with run_lock.hold(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)  # dies without removing its lock file
    holder.wait()
    assert str(holder.pid) in (tmp_path / ".fastdpo.lock").read_text()
    with run_lock.hold(tmp_path):
        assert str(os.getpid()) in (tmp_path / ".fastdpo.lock").read_text()
    assert f"took over the stale lock of pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / ".fastdpo.lock").exists()  # released


def test_the_lock_is_released_when_training_fails(gpt2_dir, tmp_path, monkeypatch):
    from fastdpo import DPOTrainer

    def fail(self, indices):
        raise RuntimeError("boom")

    trainer = make_trainer(gpt2_dir, tmp_path, max_steps=1)
    monkeypatch.setattr(DPOTrainer, "training_step", fail)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not (tmp_path / ".fastdpo.lock").exists()
    other = holder_process(tmp_path)  # another process can take it
    other.kill()
    other.wait()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    from fastdpo.train import run_lock

    with run_lock.hold(tmp_path) as outer, run_lock.hold(tmp_path) as inner:
        assert outer and not inner
        assert (tmp_path / ".fastdpo.lock").exists()
    assert not (tmp_path / ".fastdpo.lock").exists()


# ----------------------------------------------------------------------------- under torchrun
# Each rank holds the output directory as the trainer and the command do: only rank 0 checks it.
RANKS = """
import sys
from fastdpo.train.dist import close_distributed, init_distributed, rank_and_world
from fastdpo.train.run_dir import RunDir
init_distributed()
rank = rank_and_world()[0]
run_dir = RunDir(sys.argv[1], enabled=rank == 0)
try:
    with run_dir.writing(), run_dir.writing():  # the inner one (nested) exchanges nothing
        said = f"rank {rank} writes"
except ValueError as error:
    said = f"rank {rank} refused: {type(error).__name__}: {error}"
# A file per rank: two processes' lines on one shared stdout pipe can interleave under load.
with open(f"{sys.argv[2]}/rank{rank}.txt", "w") as f:
    f.write(said)
close_distributed()
"""


def each_rank_says(out: pathlib.Path) -> list[str]:
    said = out.parent / f"{out.name}-said"
    said.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["--no-python", sys.executable, "-c", RANKS, str(out), str(said)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(path.read_text() for path in said.glob("rank*.txt"))


def test_under_torchrun_every_rank_raises_the_error_of_rank_0(tmp_path):
    out = tmp_path / "run"
    files = users_files(out)
    refused = each_rank_says(out)
    assert len(refused) == 2 and refused[0].startswith("rank 0 refused: OutputDirError: ")
    assert refused[1] == "rank 1" + refused[0].removeprefix("rank 0")  # the same one-line error
    assert "checkpoint-notes.txt" in refused[0] and same_files(out, files)
    assert each_rank_says(tmp_path / "new") == ["rank 0 writes", "rank 1 writes"]


def test_an_error_that_cannot_be_pickled_reaches_the_other_ranks_as_its_message(monkeypatch):
    from fastdpo.train import dist

    class Refused(ValueError):  # a local class: pickle cannot name it
        pass

    sent = []
    monkeypatch.setattr(dist, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(dist.dist, "broadcast_object_list", lambda box, src: sent.append(pickle.dumps(box)))
    error = Refused("the output directory is a file")
    assert dist.rank0_outcome(error) is error  # rank 0 raises its own error
    (received,) = pickle.loads(sent[0])
    assert type(received) is RuntimeError and str(received) == "Refused: the output directory is a file"
