"""The ``fastdpo`` command: help, training a saved model end to end, eval, resume, the built-in default."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from lm_helpers import PAIRS, assert_same_weights, load, weights, write_jsonl

from fastdpo import DPOConfig, DPOTrainer
from fastdpo.train import default as default_module
from fastdpo.train.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--max-length", "64", "--max-prompt-length", "32", "--no-progress", "--lr", "1e-2"]


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_help():
    out = subprocess.run(
        [sys.executable, "-m", "fastdpo", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
    for command, expected in (
        ("train", ["--model", "--data", "--resume", "--reference", "torchrun"]),
        ("eval", ["--model", "--ref-model", "--data"]),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "fastdpo", command, "--help"], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        for word in expected:
            assert word in out.stdout, (command, word)


def test_train_a_saved_model_end_to_end(gpt2_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    heldout = write_jsonl(tmp_path / "heldout.jsonl", PAIRS[:2])
    args = [
        "train",
        "--model",
        str(gpt2_dir),
        "--data",
        str(pairs_file),
        "--eval-data",
        str(heldout),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "3",
        "--eval-steps",
        "2",
        *FAST,
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training pairs, implicit reward" in printed and "held-out pairs, policy log-prob" in printed
    lines = read_jsonl(out / "metrics.jsonl")
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "eval_rewards/accuracies" in x] == [0, 2, 4]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint-4" / "trainer_state.pt").is_file()
    trained, tokenizer = load(out / "final")
    assert tokenizer.eos_token == "<|endoftext|>"
    assert_same_weights(weights(trained), weights(load(out / "checkpoint-4")[0]))

    # a second run in the same directory starts afresh
    assert main(args[: -len(FAST) - 6] + ["--max-steps", "2", "--batch-size", "3", *FAST]) == 0
    assert [x["step"] for x in read_jsonl(out / "metrics.jsonl") if "loss" in x] == [1, 2]
    assert not (out / "checkpoint-4").exists()

    assert (
        main(["eval", "--model", str(out / "final"), "--ref-model", str(gpt2_dir), "--data", str(heldout)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "implicit reward" in printed and str(heldout) in printed and "/2" in printed


def test_model_without_data_is_an_error(gpt2_dir, capsys):
    assert main(["train", "--model", str(gpt2_dir)]) == 2
    assert capsys.readouterr().err == "fastdpo: error: --data FILE.jsonl is required with --model\n"


def test_resume_from_the_command_line(gpt2_dir, pairs_file, tmp_path, monkeypatch, capsys):
    common = [
        "train",
        "--model",
        str(gpt2_dir),
        "--data",
        str(pairs_file),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--no-plot",
        *FAST,
    ]
    assert main(common + ["--output-dir", str(tmp_path / "full")]) == 0
    step = DPOTrainer.training_step

    def killed_during_step_3(self, indices):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self, indices)

    monkeypatch.setattr(DPOTrainer, "training_step", killed_during_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(common + ["--output-dir", str(tmp_path / "cut")])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(common + ["--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    assert "0/6" in capsys.readouterr().out  # the accuracy before training comes from the checkpoint
    assert_same_weights(
        weights(load(tmp_path / "full" / "final")[0]), weights(load(tmp_path / "cut" / "final")[0])
    )


def test_default_model_cache_is_built_once_and_safely(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    builds = []

    def fake_build(directory, log=print):
        builds.append(directory)
        (directory / "config.json").write_text(json.dumps({"built": len(builds)}))
        if len(builds) == 1:  # another process finishes its build while this one is still writing
            target = default_module.default_model_dir()
            target.mkdir(parents=True)
            (target / "config.json").write_text(json.dumps({"built": "other"}))

    monkeypatch.setattr(default_module, "build_default_model", fake_build)
    path = default_module.default_model(log=lambda *a: None)
    assert json.loads((path / "config.json").read_text()) == {"built": "other"}  # the first rename won
    assert default_module.default_model(log=lambda *a: None) == path and len(builds) == 1  # cached
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left


def test_builtin_default_learns_the_preference(tmp_path, monkeypatch, capsys):
    """`fastdpo train` with no model or data: builds the tiny GPT-2 (full recipe), then fewer DPO steps."""
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "default"
    assert main(["train", "--output-dir", str(out), "--max-steps", "30", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "built-in default" in printed and "held-out pairs, implicit reward" in printed
    evals = [x for x in read_jsonl(out / "metrics.jsonl") if "eval_pairs" in x]
    before, after = evals[0], evals[-1]
    assert (
        before["step"] == 0
        and after["step"] == 30
        and after["eval_pairs"] == 16
        and after["train_pairs"] == 32
    )
    # before: the pretrained model prefers the ordinary completion of every pair, on both splits
    assert before["train_logps/accuracies"] <= 0.1 and before["eval_logps/accuracies"] <= 0.1
    assert before["eval_rewards/accuracies"] == 0.0
    # after: the preference holds on pairs never trained on
    assert after["eval_rewards/accuracies"] >= 0.9 and after["train_rewards/accuracies"] == 1.0
    assert after["train_logps/accuracies"] >= 0.5
    assert (out / "training.png").is_file()
    assert os.listdir(tmp_path / "cache") == [default_module.default_model_dir().name]


def test_command_line_options_reach_the_config():
    from fastdpo.train.cli import DEFAULT_RUN, build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "train",
            "--lr",
            "3e-4",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--no-bf16",
            "--max-grad-norm",
            "0",
            "--loss-type",
            "sigmoid",
            "sft",
            "--reference",
            "precompute",
            "--max-prompt-length",
            "0",
            "--strict",
            "--no-fused-linear",
            "--lr-scheduler",
            "constant",
            "--seed",
            "7",
        ]
    )
    config = config_from_args(args, {"output_dir": "x"})
    assert (config.learning_rate, config.num_train_epochs, config.per_device_train_batch_size) == (3e-4, 2, 4)
    assert config.gradient_accumulation_steps == 2 and config.bf16 is False and config.max_grad_norm == 0
    assert (
        config.loss_type == ["sigmoid", "sft"]
        and config.precompute_ref_log_probs
        and not config.reference_free
    )
    assert config.max_prompt_length is None and config.strict_data and config.fused_linear is False
    assert config.lr_scheduler_type == "constant" and config.seed == 7
    default = config_from_args(build_parser().parse_args(["train"]), DEFAULT_RUN)
    assert default.bf16 is None and default.learning_rate == DEFAULT_RUN["learning_rate"]
    assert config_from_args(build_parser().parse_args(["train", "--bf16"]), {}).bf16 is True
    short = config_from_args(build_parser().parse_args(["train", "--max-length", "256"]), {})
    assert (short.max_length, short.max_prompt_length) == (256, 128)  # the default 512 would not fit


def test_model_from_the_hugging_face_cache(gpt2_dir, pairs_file, tmp_path):
    # The layout huggingface_hub gives a downloaded model: models--org--name/{refs/main, snapshots/<commit>/}
    snapshot = tmp_path / "hub" / "models--fastdpo--tiny-gpt2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for path in gpt2_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "fastdpo",
        "train",
        "--model",
        "fastdpo/tiny-gpt2",
        "--data",
        str(pairs_file),
        "--max-steps",
        "1",
        "--reference",
        "precompute",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-plot",
        *FAST,
    ]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fastdpo/tiny-gpt2" in out.stdout and (tmp_path / "run" / "final" / "config.json").is_file()


def test_eval_scores_without_a_trainer_or_optimizer(gpt2_dir, llama_dir, pairs_file, monkeypatch, capsys):
    from fastdpo.train import trainer as trainer_module

    model, tokenizer = load(gpt2_dir)
    config = DPOConfig(output_dir="unused", progress_bar=False, metrics_file="", max_length=64)
    expected = DPOTrainer(model, tokenizer, PAIRS, config=config, ref_model=load(llama_dir)[0])
    expected = expected.evaluate(str(pairs_file))["custom"]

    def refuse(*args, **kwargs):
        raise AssertionError("fastdpo eval built a trainer or an optimizer")

    monkeypatch.setattr(trainer_module.DPOTrainer, "__init__", refuse)
    monkeypatch.setattr("torch.optim.AdamW", refuse)
    args = ["eval", "--model", str(gpt2_dir), "--ref-model", str(llama_dir), "--data", str(pairs_file)]
    assert main(args + ["--max-length", "64"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if str(pairs_file) in line)
    reward, logps = (
        f"{round(expected[m] * 6)}/6  ({expected[m]:.0%})" for m in ("rewards/accuracies", "logps/accuracies")
    )
    assert reward in row and logps in row


def test_train_help_lists_every_config_field_with_its_default(monkeypatch, capsys):
    from fastdpo.train.arguments import cli_fields, flags, show
    from fastdpo.train.cli import DEFAULT_RUN, build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    entries = []  # one per option: its flags line and the help below it, when argparse breaks them
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("      "):
            entries[-1] += " " + line.strip()
    for field in cli_fields("train"):
        line = next((x for x in entries if x.split()[0].rstrip(",") == flags(field)[0]), None)
        assert line is not None, field.name
        assert field.metadata["help"] in line and f"(default: {show(field.default)}" in line, line
        if field.name in DEFAULT_RUN:
            assert f"built-in default: {show(DEFAULT_RUN[field.name])})" in line, line
    assert not {"precompute_ref_log_probs", "reference_free"} & {f.name for f in cli_fields("train")}


# A value other than the default for every option the command takes from DPOConfig.
GIVEN = {
    "output_dir": (["--output-dir", "x"], "x"),
    "overwrite_output_dir": (["--overwrite-output-dir"], True),
    "beta": (["--beta", "0.5"], 0.5),
    "loss_type": (["--loss-type", "sigmoid", "sft"], ["sigmoid", "sft"]),
    "loss_weights": (["--loss-weights", "0.5", "2"], [0.5, 2.0]),
    "label_smoothing": (["--label-smoothing", "0.25"], 0.25),
    "average_log_prob": (["--average-log-prob"], True),
    "f_divergence_type": (["--f-divergence-type", "js_divergence"], "js_divergence"),
    "f_alpha_divergence_coef": (["--f-alpha-divergence-coef", "0.25"], 0.25),
    "discopop_tau": (["--discopop-tau", "0.25"], 0.25),
    "simpo_gamma": (["--simpo-gamma", "0.25"], 0.25),
    "use_weighting": (["--use-weighting"], True),
    "ld_alpha": (["--ld-alpha", "0.25"], 0.25),
    "token_metrics": (["--token-metrics"], True),
    "max_length": (["--max-length", "300"], 300),
    "max_prompt_length": (["--max-prompt-length", "100"], 100),
    "strict_data": (["--strict"], True),
    "learning_rate": (["--lr", "3e-4"], 3e-4),
    "weight_decay": (["--weight-decay", "0.25"], 0.25),
    "adam_beta1": (["--adam-beta1", "0.5"], 0.5),
    "adam_beta2": (["--adam-beta2", "0.5"], 0.5),
    "adam_epsilon": (["--adam-epsilon", "1e-6"], 1e-6),
    "lr_scheduler_type": (["--lr-scheduler", "cosine"], "cosine"),
    "warmup_ratio": (["--warmup-ratio", "0.25"], 0.25),
    "warmup_steps": (["--warmup-steps", "3"], 3),
    "num_train_epochs": (["--epochs", "2"], 2.0),
    "max_steps": (["--max-steps", "5"], 5),
    "per_device_train_batch_size": (["--batch-size", "3"], 3),
    "per_device_eval_batch_size": (["--eval-batch-size", "3"], 3),
    "gradient_accumulation_steps": (["--grad-accum", "3"], 3),
    "max_grad_norm": (["--max-grad-norm", "0"], 0.0),
    "bf16": (["--no-bf16"], False),
    "gradient_checkpointing": (["--gradient-checkpointing"], True),
    "disable_dropout": (["--no-disable-dropout"], False),
    "seed": (["--seed", "7"], 7),
    "fused_linear": (["--no-fused-linear"], False),
    "backend": (["--backend", "torch"], "torch"),
    "device": (["--device", "cpu"], "cpu"),
    "metrics_file": (["--metrics-file", "m.jsonl"], "m.jsonl"),
    "eval_steps": (["--eval-steps", "3"], 3),
    "save_steps": (["--save-steps", "3"], 3),
    "save_total_limit": (["--save-total-limit", "2"], 2),
    "progress_bar": (["--no-progress"], False),
}


def test_every_config_field_is_set_by_its_option():
    from fastdpo.train.arguments import cli_fields
    from fastdpo.train.cli import build_parser, config_from_args

    assert set(GIVEN) == {f.name for f in cli_fields("train")}  # a new field needs a line here
    argv = [word for words, _ in GIVEN.values() for word in words]
    config = config_from_args(build_parser().parse_args(["train", *argv]), {})
    for name, (_, expected) in GIVEN.items():
        assert getattr(config, name) == expected, name
        assert getattr(config, name) != getattr(DPOConfig(), name), name  # the option changed something
    # the long flag of a field with a short one works too
    long = build_parser().parse_args(
        ["train", "--learning-rate", "0.5", "--per-device-train-batch-size", "2"]
    )
    assert (
        config_from_args(long, {}).learning_rate,
        config_from_args(long, {}).per_device_train_batch_size,
    ) == (0.5, 2)


@pytest.mark.parametrize(
    "words, expected", [([], 512), (["auto"], 512), (["0"], None), (["none"], None), (["100"], 100)]
)
def test_max_prompt_length_on_the_command_line(words, expected):
    from fastdpo.train.cli import build_parser, config_from_args

    argv = ["train"] + (["--max-prompt-length", *words] if words else [])
    assert config_from_args(build_parser().parse_args(argv), {}).max_prompt_length == expected


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-length", "long"], "argument --max-length: invalid int value: 'long'"),
        (["--lr-scheduler", "step"], "argument --lr-scheduler/--lr-scheduler-type: invalid choice: 'step'"),
        (["--loss-type", "sigmoid", "nope"], "argument --loss-type: invalid choice: 'nope'"),
    ],
)
def test_bad_option_values_are_one_line_errors(argv, message, capsys):
    from fastdpo.train.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *argv])
    assert message in capsys.readouterr().err
