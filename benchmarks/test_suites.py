"""Every method of every suite (``benchmarks/suites.py``), side by side in one run.

    pytest benchmarks/test_suites.py --benchmark-only [--bench-size full] [-k linear]

A case is a suite, a named shape of the chosen size, a dtype, a mode and a method; the cases of a
shape, dtype and mode run one after the other on one set of inputs, in one pytest-benchmark group. pytest-benchmark times the
calls in this process; a fresh subprocess (``benchmarks.probe``) measures the peak extra memory of
one call and the largest per-sequence error against float64, which go into ``extra_info``. No
timing asserts. Where this CPU runs a dtype too slowly (``Suite.slow_dtypes``), its shapes are cut
to ``SLOW_SEQ_LEN`` positions, and ``extra_info`` says why.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from benchmarks.conftest import bench_size, timing
from benchmarks.probe import probe_in_subprocess
from benchmarks.suite import run_once
from benchmarks.suites import SUITES

SLOW_SEQ_LEN = 64


class Point(NamedTuple):
    suite: str
    shape_name: str
    shape: tuple[int, ...]
    dtype: str
    note: str  # why the shape was cut, or ""

    def __str__(self) -> str:
        return f"{self.suite}-{self.shape_name}-{self.dtype}"


def points(size: str) -> list[Point]:
    found = []
    for suite in SUITES.values():
        slow = suite.slow_dtypes()
        for shape_name, shape in suite.shapes[size].items():
            for dtype in suite.dtypes:
                note, cut = "", shape
                if dtype in slow:
                    at = suite.dims.index("seq_len")
                    cut = (*shape[:at], min(shape[at], SLOW_SEQ_LEN), *shape[at + 1 :])
                    note = f"{dtype} cut to seq_len {cut[at]}: {slow[dtype]}"
                found.append(Point(suite.name, shape_name, cut, dtype, note))
    return found


def pytest_generate_tests(metafunc):
    """Cases point by point, so one point's inputs serve all its cases and the group runs together."""
    if "case" not in metafunc.fixturenames:
        return
    cases = []
    for point in points(bench_size(metafunc.config)):
        suite = SUITES[point.suite]
        for mode in suite.modes:
            for method in suite.available():
                if mode == "forward" or method not in suite.forward_only:
                    cases.append(pytest.param((point, method, mode), id=f"{point}-{mode}-{method}"))
    metafunc.parametrize("case", cases)


_inputs: dict[Point, dict] = {}


def inputs_at(p: Point) -> dict:
    """The inputs of ``p``, made once; only the latest point's are kept (full-size inputs are GBs)."""
    if p not in _inputs:
        _inputs.clear()
        _inputs[p] = SUITES[p.suite].make_inputs(p.shape, p.dtype)
    return _inputs[p]


@pytest.fixture(scope="session")
def truths(tmp_path_factory):
    """Where each point's float64 ground truth is kept, computed by the first probe at the point."""
    return tmp_path_factory.mktemp("ground_truth")


def test_suite(benchmark, case, truths, request):
    p, method, mode = case
    suite = SUITES[p.suite]
    benchmark.group = f"{p.suite} {p.shape_name} {p.shape} {p.dtype} {mode}"
    benchmark.extra_info.update(suite=p.suite, shape=p.shape, dtype=p.dtype, mode=mode, method=method)
    if p.note:
        benchmark.extra_info["note"] = p.note
    error = method not in suite.forward_only
    truth = str(truths / f"{p}.pt")
    probe = probe_in_subprocess(p.suite, method, p.shape, p.dtype, mode, error=error, truth_file=truth)
    benchmark.extra_info.update(probe)
    if error:
        benchmark.extra_info["max_abs_error_vs_float64"] = benchmark.extra_info.pop("max_abs_error")
    fn, inputs = suite.method(method), inputs_at(p)
    benchmark.pedantic(run_once, args=(suite, fn, inputs, mode), iterations=1, **timing(request.config))
