"""The byte counts and peak-bandwidth lookup the GPU benchmarks report (they run only on CUDA)."""

import pytest
import torch

from benchmarks.test_triton_gpu import minimum_bytes, peak_gbps


def test_minimum_bytes_counts_counted_rows_once_and_the_gradient_once():
    logits = torch.zeros(4, 9, 50, dtype=torch.bfloat16)
    labels = torch.ones(4, 9, dtype=torch.long)
    labels[:, :3] = -100  # 6 of the 8 shifted labels per sequence are counted: 24 rows of 100 bytes
    forward = 24 * 100 + 36 * 8 + 3 * 4 * 8 * 4  # rows read, labels read, 3 float32 per position written
    assert minimum_bytes(logits, labels, "forward") == forward
    assert minimum_bytes(logits, labels, "forward_backward") == forward + 24 * 100 + 36 * 100


DEVICES = [
    ("NVIDIA A100-SXM4-80GB", 2039),
    ("NVIDIA A100-SXM4-40GB", 1555),
    ("NVIDIA H100 PCIe", 2000),
    ("NVIDIA H100 80GB HBM3", 3350),
    ("NVIDIA L40S", 864),
    ("NVIDIA L4", 300),
    ("Some New GPU", None),
]


@pytest.mark.parametrize("name, gbps", DEVICES)
def test_peak_bandwidth_by_device_name(monkeypatch, name, gbps):
    monkeypatch.delenv("FASTDPO_PEAK_GBPS", raising=False)
    assert peak_gbps(name) == gbps
    monkeypatch.setenv("FASTDPO_PEAK_GBPS", "123.5")
    assert peak_gbps(name) == 123.5
