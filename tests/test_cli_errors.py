"""User errors on the command line: one line, exit status 2, no traceback unless --debug
(issue 13, item 11, and the non-UTF-8 data it names)."""

import os
import pathlib
import subprocess
import sys

import pytest
from lm_helpers import PAIRS, write_jsonl

from fastdpo.train.cli import main
from fastdpo.train.data import load_preference_data

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--max-length", "64", "--max-prompt-length", "32", "--no-progress", "--no-plot", "--max-steps", "1"]


def not_utf8(tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", PAIRS[:2])
    path.write_bytes(
        path.read_bytes() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    return path


def one_line_error(capsys, *expected):
    err = capsys.readouterr().err
    assert err.startswith("fastdpo: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)


def test_non_utf8_data_names_file_and_line(gpt2_dir, tmp_path):
    from transformers import AutoTokenizer

    path = not_utf8(tmp_path)
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_preference_data(path, AutoTokenizer.from_pretrained(gpt2_dir))


@pytest.mark.parametrize(
    "problem", ["missing data", "not utf-8", "not json", "missing model", "no checkpoint"]
)
def test_user_errors_are_one_line_and_exit_2(gpt2_dir, pairs_file, tmp_path, capsys, problem):
    data, model, extra = str(pairs_file), str(gpt2_dir), []
    if problem == "missing data":
        data, expected = (
            str(tmp_path / "nope.jsonl"),
            [f"{tmp_path / 'nope.jsonl'}: No such file or directory"],
        )
    elif problem == "not utf-8":
        data, expected = str(not_utf8(tmp_path)), ["latin1.jsonl:3: not UTF-8 text"]
    elif problem == "not json":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
        data, expected = str(tmp_path / "bad.jsonl"), ["bad.jsonl:2: not valid JSON"]
    elif problem == "missing model":
        model, expected = str(tmp_path / "no-model"), [f"{tmp_path / 'no-model'}: no such model directory"]
    else:
        extra, expected = ["--resume"], [f"{tmp_path / 'run'}: no checkpoint-<step> directory to resume from"]
    args = ["train", "--model", model, "--data", data, "--output-dir", str(tmp_path / "run"), *FAST, *extra]
    assert main(args) == 2
    one_line_error(capsys, *expected)
    if problem != "no checkpoint":
        assert not (tmp_path / "run").exists()  # a run that failed before writing leaves nothing


def test_debug_shows_the_traceback(gpt2_dir, tmp_path):
    args = ["train", "--model", str(gpt2_dir), "--data", str(tmp_path / "nope.jsonl"), "--debug", *FAST]
    with pytest.raises(FileNotFoundError):
        main(args + ["--output-dir", str(tmp_path / "run")])


def test_a_bug_keeps_its_traceback(gpt2_dir, pairs_file, tmp_path, monkeypatch):
    from fastdpo import DPOTrainer

    def bug(self, indices):
        raise RuntimeError("a bug")

    monkeypatch.setattr(DPOTrainer, "training_step", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(
            [
                "train",
                "--model",
                str(gpt2_dir),
                "--data",
                str(pairs_file),
                "--output-dir",
                str(tmp_path),
                *FAST,
            ]
        )


def test_the_command_exits_2_without_a_traceback(tmp_path):
    command = [
        sys.executable,
        "-m",
        "fastdpo",
        "train",
        "--model",
        str(tmp_path / "none"),
        "--data",
        str(tmp_path / "none.jsonl"),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith(
        f"fastdpo: error: {tmp_path / 'none'}: no such model directory"
    )
