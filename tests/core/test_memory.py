"""The exact tensor-memory tracker used by the benchmarks and `slimtune compare`."""

from __future__ import annotations

import torch

from slimtune.memory import TensorMemoryPeak


def test_peak_counts_live_storages_once_and_releases_freed_ones():
    existing = torch.ones(1000)
    with TensorMemoryPeak() as tracker:
        a = torch.zeros(250, 4)  # 4,000 bytes
        view = a[:10]  # same storage: not counted again
        b = a + 1  # 4,000 bytes more: peak 8,000
        del a, view, b  # both freed
        c = torch.zeros(100)  # 400 bytes
    assert tracker.peak == 8000
    assert tracker.current == 400
    assert existing.sum() == 1000 and c.numel() == 100


def test_autograd_saved_tensors_are_counted():
    weight = torch.randn(64, 64, requires_grad=True)
    with TensorMemoryPeak() as tracker:
        x = torch.randn(128, 64)
        loss = (x @ weight).relu().sum()
    assert tracker.current >= 128 * 64 * 4 * 2  # x and the saved relu output stay alive for backward
    loss.backward()
