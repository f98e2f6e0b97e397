"""Benchmark set-up: how big (``--bench-size``), and which peer libraries are missing.

    pytest benchmarks/ --benchmark-only                    # quick: small shapes, every method
    pytest benchmarks/ --benchmark-only --bench-size full  # the issues' shapes (hours on CPU)

``FASTDPO_BENCH_SIZE=full`` in the environment does what ``--bench-size full`` does (the option
wins); ``FASTDPO_BENCH_ROUNDS=K`` overrides the timed rounds. The shapes of each size are in the
suites (``Suite.shapes``, ``benchmarks/suites.py``) and, for the trainer, ``trainer_steps.SETUPS``.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.suites import SUITES

SIZES = ("quick", "full")
# Timed rounds after warm-up rounds (the first calls compile, load kernels, fill allocator pools).
TIMING = {"quick": dict(rounds=5, warmup_rounds=1), "full": dict(rounds=3, warmup_rounds=1)}


def pytest_addoption(parser):
    parser.addoption(
        "--bench-size",
        default=os.environ.get("FASTDPO_BENCH_SIZE", "quick"),
        help="quick (default; small shapes, minutes) or full (the issues' shapes, hours on CPU); "
        "default from FASTDPO_BENCH_SIZE",
    )


def bench_size(config) -> str:
    size = config.getoption("--bench-size")
    if size not in SIZES:
        raise pytest.UsageError(f"--bench-size / FASTDPO_BENCH_SIZE must be one of {SIZES}, got {size!r}")
    return size


def timing(config) -> dict:
    """pytest-benchmark's ``rounds`` and ``warmup_rounds`` for this run's size."""
    rounds = os.environ.get("FASTDPO_BENCH_ROUNDS")
    return dict(TIMING[bench_size(config)], **({"rounds": int(rounds)} if rounds else {}))


def pytest_configure(config):
    bench_size(config)  # a bad size fails before collection, with the one-line reason


def pytest_report_header(config):
    missing = [m for suite in SUITES.values() for m in suite.missing()]
    lines = [f"fastdpo benchmarks: --bench-size {bench_size(config)}"]
    return lines + ([f"fastdpo benchmarks: missing peer methods: {missing}"] if missing else [])
