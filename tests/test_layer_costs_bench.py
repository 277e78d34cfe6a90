"""`bench/bench_layer_costs.py`: the source with converted attention layers swapped in, against the converted model
itself; its ending losses against a token-by-token loop; its summaries against the formulas written out."""

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import SOURCE_VOCAB as VOCAB, tiny_source_and_sparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_layer_costs  # noqa: E402


def source_and_conversion():
    return tiny_source_and_sparse(num_hidden_layers=3, calibrate=True)


def test_every_layer_swapped_in_is_the_converted_model_and_leaving_restores_the_source():
    source, converted = source_and_conversion()
    generator = torch.Generator().manual_seed(2)
    parts = {"part": [(torch.randint(0, VOCAB, (n,), generator=generator).tolist(),
                       torch.randint(0, VOCAB, (m,), generator=generator).tolist()) for n, m in [(5, 3), (9, 1), (2, 7)]]}
    domains = {"domain": torch.randint(0, VOCAB, (3, 20), generator=generator)}

    before = bench_layer_costs.losses(source, parts, domains)
    with bench_layer_costs.converted_attention(source, converted, [0, 1, 2]) as hybrid:
        all_swapped = bench_layer_costs.losses(hybrid, parts, domains)
    with bench_layer_costs.converted_attention(source, converted, [1]) as hybrid:
        one_swapped = bench_layer_costs.losses(hybrid, parts, domains)
    expected = bench_layer_costs.losses(converted, parts, domains)
    after = bench_layer_costs.losses(source, parts, domains)

    for text in ("part", "domain"):
        for got, want in zip(all_swapped[text], expected[text]):
            assert got[1] == want[1] and math.isclose(got[0], want[0], rel_tol=1e-5)
        assert after[text] == before[text]
        # one layer converted is neither the source nor the whole conversion
        assert all(abs(one[0] - base[0]) > 1e-4 for one, base in zip(one_swapped[text], before[text]))
        assert any(abs(one[0] - full[0]) > 1e-4 for one, full in zip(one_swapped[text], expected[text]))
    assert source.model.layers[1].self_attn is not converted.model.layers[1].self_attn


def test_ending_loss_is_the_sum_over_its_tokens_given_everything_before():
    source, _ = source_and_conversion()
    context, ending = [3, 17, 44, 8], [91, 5, 60]
    (loss, tokens), = bench_layer_costs.losses(source, {"part": [(context, ending)]}, {})["part"]
    with torch.no_grad():
        by_token = sum(
            -torch.log_softmax(source(torch.tensor([context + ending[:j]])).logits[0, -1], -1)[ending[j]].item()
            for j in range(len(ending))
        )
    assert tokens == 3 and math.isclose(loss, by_token, rel_tol=1e-5)


def test_summary_weights_examples_by_their_tokens():
    source = [(2.0, 1), (9.0, 3)]  # mean 11 / 4
    converted = [(3.0, 1), (12.0, 3)]  # mean 15 / 4: the conversion adds 1.0
    singles = [[(2.5, 1), (9.0, 3)], [(2.0, 1), (10.0, 3)]]  # add 0.125 and 0.25
    total, summed = bench_layer_costs.summary(source, converted, singles)
    assert math.isclose(total, 1.0) and math.isclose(summed, 0.375)
    assert math.isclose(bench_layer_costs.summary(source, converted, singles, picks=[1, 1])[0], 1.0)
    # Every example adds the same per token: no resampling changes the total.
    assert bench_layer_costs.bootstrap_errors(source * 5, converted * 5, [s * 5 for s in singles])[0] < 1e-12


def test_bootstrap_error_of_the_added_loss_is_the_standard_error_of_a_mean():
    """With one token per example the added loss is a mean of per-example differences, whose bootstrap standard
    error is std / sqrt(n) (population std): within the bootstrap's own noise of 1000 resamples (2-3%)."""
    generator = torch.Generator().manual_seed(3)
    base = torch.rand(200, generator=generator).tolist()
    added = (torch.randn(200, generator=generator) * 0.5 + 0.2).tolist()
    source = [(b, 1) for b in base]
    converted = [(b + a, 1) for b, a in zip(base, added)]
    singles = [[(b + a / 2, 1) for b, a in zip(base, added)]] * 2  # two layers, each adding half: ratio exactly 1
    total_error, summed_error, ratio_error = bench_layer_costs.bootstrap_errors(source, converted, singles)
    expected = torch.tensor(added).std(unbiased=False).item() / math.sqrt(200)
    assert abs(total_error / expected - 1) < 0.1
    assert math.isclose(summed_error, total_error, rel_tol=1e-6) and ratio_error < 1e-9


def by_character(text):
    """A tokenizer with one token per character."""
    return {"input_ids": [ord(c) for c in text]}


def test_domain_blocks_are_each_files_tail_cut_into_blocks(tmp_path):
    """`--texts`: each file's last TAIL_CHARACTERS characters, tokenised, cut into `blocks` blocks of `length` tokens from
    the start of that tail, named by the file's stem."""
    file = tmp_path / "notes.txt"
    file.write_text("x" * 50 + "".join(chr(65 + i % 26) for i in range(bench_layer_costs.TAIL_CHARACTERS)))
    blocks = bench_layer_costs.domain_blocks(by_character, {"notes": file}, blocks=3, length=4)
    assert list(blocks) == ["notes"]
    assert blocks["notes"].tolist() == [[65, 66, 67, 68], [69, 70, 71, 72], [73, 74, 75, 76]]


def test_a_text_too_short_for_the_blocks_asked_is_refused_naming_the_file_and_the_fix(tmp_path):
    file = tmp_path / "short.txt"
    file.write_text("abcdefghij")
    with pytest.raises(SystemExit, match=r"short\.txt: its tail holds 2 blocks of 4 tokens, not 3; ask for fewer"):
        bench_layer_costs.domain_blocks(by_character, {"short": file}, 3, 4)
