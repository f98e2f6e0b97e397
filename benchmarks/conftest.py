"""Benchmark set-up: report which peer libraries are missing instead of dropping them silently."""

from benchmarks.methods import missing_methods


def pytest_report_header(config):
    missing = missing_methods()
    return f"fastdpo benchmarks: missing peer methods: {missing}" if missing else None
