"""`bench/bench_margin_bands.py`: the four endings scored in one right-padded batch against each ending scored alone,
token by token; the margin and the added losses against the formulas written out and lm-eval's acc_norm rule."""

import math
import sys
from pathlib import Path

import torch

from conftest import SOURCE_VOCAB as VOCAB, tiny_source_and_sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_margin_bands  # noqa: E402


def tiny_models():
    return tiny_source_and_sparse(num_hidden_layers=2)


def example(context, endings, gold=0):
    return {"context": context, "endings": endings, "characters": [4 * len(e) for e in endings], "gold": gold}


def test_batched_endings_are_each_ending_scored_alone_token_by_token():
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    parts = {"part": [example(draw(6), [draw(3), draw(1), draw(7), draw(4)]), example(draw(2), [draw(5)] * 2 + [draw(2)] * 2)]}
    for model in tiny_models():  # a dense Llama and a routed GQE model
        got = bench_margin_bands.ending_log_likelihoods(model, parts)["part"]
        for scores, item in zip(got, parts["part"]):
            with torch.no_grad():
                want = [sum(torch.log_softmax(model(torch.tensor([item["context"] + ending[:j]])).logits[0, -1].float(),
                                              -1)[ending[j]].item() for j in range(len(ending)))
                        for ending in item["endings"]]
            assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) for a, b in zip(scores, want))


def test_margin_is_gold_per_character_minus_the_best_wrong_one_and_its_sign_is_acc_norm():
    items = [example([1], [[1]] * 4, gold=2), example([1], [[1]] * 4, gold=0)]
    items[0]["characters"] = [10, 20, 5, 8]
    items[1]["characters"] = [4, 4, 2, 2]
    scores = [[-10.0, -10.0, -4.0, -6.0],  # per character -1, -0.5, -0.8, -0.75: the best is 1, not gold 2
              [-2.0, -6.0, -3.0, -4.0]]   # -0.5, -1.5, -1.5, -2: gold 0 is the best
    margins = bench_margin_bands.margins(items, scores)
    assert math.isclose(margins[0], -0.8 - -0.5) and math.isclose(margins[1], -0.5 - -1.5)
    for item, lls, margin in zip(items, scores, margins):  # lm-eval: argmax of ll / len(choice) is the gold one
        chosen = max(range(4), key=lambda j: lls[j] / item["characters"][j])
        assert (margin > 0) == (chosen == item["gold"])


def test_added_losses_are_per_token_on_gold_and_the_mean_of_the_wrong_ones():
    item = example([1], [[1, 2], [3], [4, 5, 6, 7], [8]], gold=1)
    source = [-4.0, -1.0, -8.0, -2.0]
    variant = [-5.0, -1.5, -8.0, -5.0]  # per token: +0.5 on 0, +0.5 on gold, 0 on 2, +3 on 3
    gold, wrong = bench_margin_bands.added_losses([item], [variant], [source])
    assert math.isclose(gold[0], 0.5) and math.isclose(wrong[0], (0.5 + 0.0 + 3.0) / 3)
    mean, error = bench_margin_bands.mean_and_error([1.0, 2.0, 3.0, 6.0])
    assert math.isclose(mean, 3.0) and math.isclose(error, math.sqrt((4 + 1 + 0 + 9) / 3 / 4))


def test_layer_bands_split_evenly_and_leave_out_a_band_of_every_layer():
    assert bench_margin_bands.layer_bands(0, 29, 3, 30) == [range(0, 10), range(10, 20), range(20, 30)]
    assert bench_margin_bands.layer_bands(10, 19, 10, 30) == [range(layer, layer + 1) for layer in range(10, 20)]
    assert bench_margin_bands.layer_bands(0, 6, 2, 7) == [range(0, 3), range(3, 7)]
    assert bench_margin_bands.layer_bands(0, 29, 1, 30) == []  # the whole conversion, scored anyway
    assert bench_margin_bands.layer_bands(0, 29, 0, 30) == []
    assert bench_margin_bands.layer_bands(10, 19, 1, 30) == [range(10, 20)]
