"""The benchmark interface: every method of every suite runs through the one signature and agrees
with the shared float64 ground truth; the shared ground truth itself; ``--bench-size``."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks.ground_truth import (
    float64_linear_sequence_logps,
    float64_sequence_logps,
    float64_token_logps,
    make_linear,
    make_logits,
)
from benchmarks.probe import probe
from benchmarks.suite import MODES, run_once
from benchmarks.suites import SUITES, get_suite
from benchmarks.test_suites import SLOW_SEQ_LEN, points
from benchmarks.trainer_steps import SETUPS, STEPS, load_setup, make_assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small enough for a test, odd on purpose; ``pairs`` first, as in every suite's dims.
TINY = {"pairs": 2, "seq_len": 7, "hidden": 12, "vocab": 53}
CASES = [(name, method) for name, suite in SUITES.items() for method in suite.available()]


@pytest.mark.parametrize(("suite_name", "method"), CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_every_method_runs_through_the_one_signature(suite_name, method):
    suite = SUITES[suite_name]
    inputs = suite.make_inputs(tuple(TINY[d] for d in suite.dims), "float32")
    fn = suite.method(method)
    out = fn(inputs)
    assert out.loss.dim() == 0 and out.sequence_logps.shape == (2 * TINY["pairs"],)
    if method not in suite.forward_only:
        exact = suite.ground_truth(inputs)
        torch.testing.assert_close(out.sequence_logps.detach().double(), exact, atol=1e-4, rtol=0)
    for mode in ("forward",) if method in suite.forward_only else MODES:
        run_once(suite, fn, inputs, mode)
        assert all(not inputs[k].requires_grad and inputs[k].grad is None for k in suite.grad_inputs)


def test_every_suite_names_a_runnable_baseline_and_its_shapes():
    for suite in SUITES.values():
        assert suite.baseline in suite.methods
        for size in ("quick", "full"):
            assert all(len(shape) == len(suite.dims) for shape in suite.shapes[size].values())
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        get_suite("nope")
    with pytest.raises(ValueError, match="unknown or unavailable linear method 'naive'"):
        SUITES["linear"].method("naive")


@pytest.mark.skipif(
    "compute-floor-counted" not in SUITES["logits"].methods, reason="the compute floor is the native kernel's"
)
def test_compute_floor_is_the_forward_of_one_row_at_every_position():
    suite = SUITES["logits"]
    inputs = suite.make_inputs((2, 7, 53), "bfloat16")
    out = suite.method("compute-floor-counted")(inputs)
    logits = inputs["logits"]
    one_row = logits[0, 0].expand(logits.shape).contiguous()
    exact = float64_sequence_logps(one_row, inputs["labels"])
    assert not torch.allclose(exact, suite.ground_truth(inputs))  # a different batch than the inputs
    torch.testing.assert_close(out.sequence_logps.double(), exact, atol=1e-4, rtol=0)


def test_ignored_positions_count_zero_even_on_a_masked_logit():
    logits, labels = make_logits(2, 5, 7)
    labels[:, 2] = -100
    logits[:, 1, 0] = float("-inf")  # what an ignored label's clamp(min=0) would pick
    tokens = float64_token_logps(logits, labels)
    assert torch.isfinite(tokens).all() and (tokens[:, 1] == 0).all()


def test_chunked_ground_truths_equal_the_one_float64_log_softmax():
    logits, labels = make_logits(3, 11, 17, torch.bfloat16)
    whole = float64_token_logps(logits, labels).sum(-1)
    torch.testing.assert_close(float64_sequence_logps(logits, labels, rows=4), whole, rtol=0, atol=1e-12)
    hidden, weight, bias, labels = make_linear(3, 11, 6, 17)
    exact = float64_sequence_logps(hidden.double() @ weight.double().T + bias.double(), labels)
    got = float64_linear_sequence_logps(hidden, weight, labels, bias=bias, rows=4)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)


def test_probe_reads_the_ground_truth_a_caller_keeps(tmp_path):
    truth = str(tmp_path / "truth.pt")
    shape = (1, 6, 40)
    first = probe("logits", "fastdpo-torch", shape, "float32", "forward", error=True, truth_file=truth)
    exact = torch.load(truth)
    assert exact.dtype == torch.float64 and first["max_abs_error"] < 1e-4
    torch.save(exact + 1.0, truth)  # a cached truth is used as it is, not recomputed
    again = probe("logits", "fastdpo-torch", shape, "float32", "forward", error=True, truth_file=truth)
    assert abs(again["max_abs_error"] - 1.0) < 1e-4


def test_slow_dtypes_are_cut_to_a_short_sequence(monkeypatch):
    linear = SUITES["linear"]
    slow = dataclasses.replace(linear, slow_dtypes=lambda: {"bfloat16": "no bf16 matmul here"})
    monkeypatch.setitem(SUITES, "linear", slow)
    full = [p for p in points("full") if p.suite == "linear"]
    assert {p.shape[1] for p in full if p.dtype == "bfloat16"} == {SLOW_SEQ_LEN}
    assert all("no bf16 matmul here" in p.note for p in full if p.dtype == "bfloat16")
    assert {p.shape for p in full if p.dtype == "float32"} == set(linear.shapes["full"].values())


def _collect(*args, env=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )


def _test_ids(collected) -> list[str]:
    return [line for line in collected.stdout.splitlines() if "::" in line]


def test_bench_size_selects_the_shapes(monkeypatch):
    monkeypatch.delenv("FASTDPO_BENCH_SIZE", raising=False)
    quick, full = _collect(), _collect("--bench-size", "full")
    assert quick.returncode == 0 and full.returncode == 0, quick.stderr + full.stderr
    for suite in SUITES.values():
        for name in suite.shapes["quick"]:
            assert (
                f"[{suite.name}-{name}-float32-" in quick.stdout
                and f"[{suite.name}-{name}-" not in full.stdout
            )
        for name in suite.shapes["full"]:
            assert (
                f"[{suite.name}-{name}-float32-" in full.stdout
                and f"[{suite.name}-{name}-" not in quick.stdout
            )
    assert _test_ids(_collect(env={"FASTDPO_BENCH_SIZE": "full"})) == _test_ids(full)
    bad = _collect(env={"FASTDPO_BENCH_SIZE": "huge"})
    assert bad.returncode != 0 and "must be one of ('quick', 'full'), got 'huge'" in bad.stderr


def test_every_trainer_takes_a_step(tmp_path):
    setup = dataclasses.replace(
        SETUPS["quick"],
        n_layer=1,
        n_embd=16,
        vocab=300,
        pairs=4,
        prompt=6,
        completion=9,
        max_length=24,
        max_prompt_length=12,
    )
    directory = make_assets(tmp_path, setup)
    assert load_setup(directory) == setup
    for name, make_step in STEPS.items():
        make_step(directory, str(tmp_path / name))()
