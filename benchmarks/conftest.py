"""Benchmark set-up: report which peer libraries are missing instead of dropping them silently."""

from benchmarks import linear_methods, methods


def pytest_report_header(config):
    missing = methods.missing_methods() + linear_methods.missing_methods()
    return f"fastdpo benchmarks: missing peer methods: {missing}" if missing else None
