"""`bench/bench_calibration.py`: every recipe of its grid is one the converter accepts for SmolLM2-135M's shape (30
layers, 9 query heads over 3 KV heads), so that a run of several recipes does not fail on one after an hour of the
others; and the recipes that give some layers their own k attend the query heads their comments say."""

import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from convert.layout import BLOCK_LAYOUTS, parse_layer_top_k

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_calibration  # noqa: E402

SMOLLM2_SHAPE = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
RECIPE_KEYS = {"tokens", "output_ridge", "router_ridge", "block_layout", "seq_len", "first_token_weight",
               "refine_epochs", "refine_learning_rate", "refine_batch_size", "drift_correction", "dense_layers",
               "layer_top_k"}


def query_heads_per_token(recipe, top_k=2) -> int:
    """Query heads attended per token over the network: 9 in a dense layer, G * k routed + 1 shared in a routed one."""
    dense = set(recipe.get("dense_layers", []))
    per_layer = parse_layer_top_k(recipe.get("layer_top_k", []), SMOLLM2_SHAPE, top_k, sorted(dense)) or [top_k] * 30
    return sum(9 if layer in dense else 3 * k + 1 for layer, k in enumerate(per_layer))


@pytest.mark.parametrize("index", range(len(bench_calibration.GRID)))
def test_every_recipe_is_one_the_converter_accepts(index):
    recipe = bench_calibration.GRID[index]
    assert set(recipe) <= RECIPE_KEYS, f"recipe {index}: keys convert_and_measure does not read: {set(recipe) - RECIPE_KEYS}"
    assert recipe["block_layout"] in BLOCK_LAYOUTS
    assert all(0 <= layer < 30 for layer in recipe.get("dense_layers", []))
    assert query_heads_per_token(recipe) <= 270  # parses, and attends no more than the source


def test_heads_per_token_of_the_recipes_that_trade_layers():
    grid = bench_calibration.GRID
    assert query_heads_per_token(grid[2]) == 210  # K = 2 everywhere: 7 of 9 in every layer
    assert query_heads_per_token(grid[17]) == 230  # layers 10-19 dense
    assert [query_heads_per_token(grid[i]) for i in range(20, 27)] == [209] * 7  # K = 2's compute
