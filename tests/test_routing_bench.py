"""`bench/bench_routing.py`'s head-keeping rules against a per-token loop."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_routing  # noqa: E402


def test_each_group_keeps_its_largest_heads():
    generator = torch.Generator().manual_seed(0)
    contribution = torch.rand(2, 5, 9, generator=generator)  # [b, t, H], 3 groups of 3 heads
    keep = bench_routing.group_top_k(num_groups=3, top_k=2)(0, contribution)
    for b in range(2):
        for t in range(5):
            for g in range(3):
                heads = contribution[b, t, 3 * g : 3 * g + 3]
                expected = [1.0 if value > heads.min() else 0.0 for value in heads]
                assert keep[b, t, 3 * g : 3 * g + 3].tolist() == expected


def test_each_slot_keeps_its_largest_head():
    # Group 0: head 1 has a slot of its own (padded to two copies), heads 0 and 2 share one; group 1 likewise.
    slot_heads = {0: torch.tensor([[1, 1], [0, 2], [5, 5], [3, 4]])}
    generator = torch.Generator().manual_seed(1)
    contribution = torch.rand(2, 5, 6, generator=generator)
    keep = bench_routing.slot_largest(slot_heads)(0, contribution)
    for b in range(2):
        for t in range(5):
            c = contribution[b, t]
            kept = {1, 5, 0 if c[0] > c[2] else 2, 3 if c[3] > c[4] else 4}
            assert keep[b, t].tolist() == [1.0 if head in kept else 0.0 for head in range(6)]
