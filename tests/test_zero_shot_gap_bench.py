"""`bench/bench_zero_shot_gap.py`'s rows against the paired-difference formulas written out by hand."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_zero_shot_gap  # noqa: E402


def scores(per_example: dict[str, list[float]]) -> dict[str, dict]:
    # As lm-eval with its bootstrap off: no standard error of the score.
    return {task: {"acc_norm": statistics.mean(values), "acc_norm_stderr": "N/A", "acc_norm_per_example": values}
            for task, values in per_example.items()}


def test_each_task_and_the_average_carry_the_paired_gap_and_its_error():
    baseline = scores({"piqa": [1, 1, 0, 1, 0, 1], "arc_easy": [1, 0, 1, 1]})
    candidate = scores({"piqa": [1, 0, 0, 1, 1, 0], "arc_easy": [0, 0, 1, 1]})
    rows = bench_zero_shot_gap.gap_rows("sparse", baseline, candidate, ["piqa", "arc_easy"])
    assert [row["task"] for row in rows] == ["piqa", "arc_easy", "average"]

    by_task = {}
    for row, task in zip(rows, ["piqa", "arc_easy"]):
        differences = [c - b for b, c in zip(baseline[task]["acc_norm_per_example"], candidate[task]["acc_norm_per_example"])]
        by_task[task] = (100 * statistics.mean(differences), 100 * statistics.stdev(differences) / math.sqrt(len(differences)))
        assert row["gap"] == pytest.approx(by_task[task][0])
        assert row["gap stderr (paired)"] == pytest.approx(by_task[task][1])
        assert row["gap"] == pytest.approx(row["candidate score"] - row["baseline"])
        assert row["score stderr"] == pytest.approx(100 * statistics.stdev(candidate[task]["acc_norm_per_example"])
                                                    / math.sqrt(len(candidate[task]["acc_norm_per_example"])))

    average = rows[-1]
    assert average["examples"] == 10
    assert average["gap"] == pytest.approx((by_task["piqa"][0] + by_task["arc_easy"][0]) / 2)
    assert average["gap stderr (paired)"] == pytest.approx(math.hypot(by_task["piqa"][1], by_task["arc_easy"][1]) / 2)
    assert average["gap"] == pytest.approx(average["candidate score"] - average["baseline"])


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


class RecordingScorer:
    """Stands in for lm-eval: per-example scores from a fixed table, and which tasks were asked for."""

    def __init__(self, per_example: dict[str, list[float]]):
        self.per_example, self.calls = per_example, []

    def __call__(self, tasks: list[str]) -> dict[str, dict]:
        self.calls.append(list(tasks))
        return scores({task: self.per_example[task] for task in tasks})


def test_scores_are_reused_for_the_same_weights_and_recomputed_for_others():
    table = {"piqa": [1.0, 0.0, 1.0, 1.0], "arc_easy": [0.0, 1.0, 1.0]}
    model, cache = tiny_model(0), {"entries": []}
    first = RecordingScorer(table)
    bench_zero_shot_gap.cached_scores(model, ["piqa"], 4, first, cache, "a")
    assert first.calls == [["piqa"]]

    # The same weights, loaded again: piqa comes from the cache, only arc_easy is scored.
    again = RecordingScorer(table)
    copy = tiny_model(0)
    copy.load_state_dict(model.state_dict())
    results = bench_zero_shot_gap.cached_scores(copy, ["piqa", "arc_easy"], 4, again, cache, "b")
    assert again.calls == [["arc_easy"]]
    assert results["piqa"]["acc_norm_per_example"] == table["piqa"]
    assert results["piqa"]["acc_norm"] == pytest.approx(0.75)

    # Fewer examples than stored: the first ones, and their mean. More than stored: scored again.
    fewer = RecordingScorer(table)
    results = bench_zero_shot_gap.cached_scores(copy, ["piqa"], 2, fewer, cache, "b")
    assert fewer.calls == [] and results["piqa"]["acc_norm_per_example"] == [1.0, 0.0]
    assert results["piqa"]["acc_norm"] == pytest.approx(0.5)
    more = RecordingScorer(table)
    bench_zero_shot_gap.cached_scores(copy, ["piqa"], 8, more, cache, "b")
    assert more.calls == [["piqa"]]

    # One weight changed by one ulp: another model, scored afresh.
    with torch.no_grad():
        copy.model.norm.weight[0] = torch.nextafter(copy.model.norm.weight[0], torch.tensor(2.0))
    changed = RecordingScorer(table)
    bench_zero_shot_gap.cached_scores(copy, ["piqa"], 4, changed, cache, "c")
    assert changed.calls == [["piqa"]]


def test_scores_from_other_library_versions_are_not_reused(monkeypatch):
    table = {"piqa": [1.0, 0.0]}
    model, cache = tiny_model(0), {"entries": []}
    bench_zero_shot_gap.cached_scores(model, ["piqa"], None, RecordingScorer(table), cache, "a")
    monkeypatch.setattr(bench_zero_shot_gap, "scoring_versions", lambda: {"torch": "0", "transformers": "0", "lm_eval": "0"})
    other = RecordingScorer(table)
    bench_zero_shot_gap.cached_scores(model, ["piqa"], None, other, cache, "a")
    assert other.calls == [["piqa"]]
