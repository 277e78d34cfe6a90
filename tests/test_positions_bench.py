"""The per-position losses behind gqe-eval's perplexity and `bench/bench_positions.py`'s ranges, against a
position-by-position loop."""

import math
import sys
from pathlib import Path

import torch

from conftest import tiny_model
from convert.evaluate import perplexity, token_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_positions  # noqa: E402


def test_position_ranges_average_what_a_per_position_loop_computes():
    model = tiny_model(gqe_variant="gqe", num_experts_per_tok=2)
    blocks = torch.randint(3, 97, (5, 24), generator=torch.Generator().manual_seed(0))
    ranges = [(1, 4), (4, 16), (16, 24)]
    means = bench_positions.mean_losses(token_losses(model, blocks, batch_size=2), ranges)
    assert list(means) == ["1-3", "4-15", "16-23", "whole window"]

    with torch.no_grad():  # position p's loss: the model's prediction from positions 0..p-1, one sequence at a time
        per_position = [[torch.nn.functional.cross_entropy(model(block[None, :p]).logits[0, -1], block[p]).item()
                         for p in range(1, 24)] for block in blocks]
    for start, end in ranges:
        expected = sum(row[p - 1] for row in per_position for p in range(start, end)) / (5 * (end - start))
        assert math.isclose(means[f"{start}-{end - 1}"], expected, rel_tol=1e-5)
    whole_window = sum(map(sum, per_position)) / (5 * 23)
    assert math.isclose(means["whole window"], whole_window, rel_tol=1e-5)
    assert math.isclose(perplexity(model, blocks, batch_size=3), math.exp(whole_window), rel_tol=1e-5)
