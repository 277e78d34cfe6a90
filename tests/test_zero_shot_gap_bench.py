"""`bench/bench_zero_shot_gap.py`'s rows against the paired-difference formulas written out by hand."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_zero_shot_gap  # noqa: E402

from convert.errors import UpcycleError  # noqa: E402
from convert.evaluate import example_indices  # noqa: E402


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
    """Stands in for lm-eval: each example's score from a fixed table of a whole split, on the examples asked for,
    and which tasks were scored."""

    def __init__(self, split: dict[str, list[float]], indices: dict[str, list[int]]):
        self.split, self.indices, self.calls = split, indices, []

    def __call__(self, tasks: list[str]) -> dict[str, dict]:
        self.calls.append(list(tasks))
        results = scores({task: [self.split[task][i] for i in self.indices[task]] for task in tasks})
        return {task: {**result, "doc_ids": self.indices[task]} for task, result in results.items()}


SPLIT = {"piqa": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], "arc_easy": [0.0, 1.0, 1.0]}


def cached(model, cache, checkpoint, limit, sample="spread", tasks=("piqa",)):
    """cached_scores as the bench calls it, on `limit` examples of SPLIT's tasks; returns its results and the
    scorer, which records what had to be scored."""
    indices = {task: example_indices(len(SPLIT[task]), limit, sample) for task in tasks}
    scorer = RecordingScorer(SPLIT, indices)
    results = bench_zero_shot_gap.cached_scores(model, indices, scorer, cache, checkpoint, limit=limit, sample=sample)
    return results, scorer


def test_scores_are_reused_for_the_same_weights_and_recomputed_for_others():
    model, cache = tiny_model(0), {"entries": []}
    _, first = cached(model, cache, "a", 4, "first")
    assert first.calls == [["piqa"]]
    assert cache["entries"][0]["doc_ids"] == [0, 1, 2, 3] and cache["entries"][0]["sample"] == "first"

    # The same weights, loaded again: piqa comes from the cache, only arc_easy is scored.
    copy = tiny_model(0)
    copy.load_state_dict(model.state_dict())
    results, again = cached(copy, cache, "b", 4, "first", tasks=("piqa", "arc_easy"))
    assert again.calls == [["arc_easy"]]
    assert results["piqa"]["acc_norm_per_example"] == SPLIT["piqa"][:4]
    assert results["piqa"]["acc_norm"] == pytest.approx(0.75)
    assert results["arc_easy"]["acc_norm_per_example"] == SPLIT["arc_easy"]  # 4 of a 3-example split: all

    # Examples among those stored: taken from the cache, in order, with their mean. Others: scored again.
    results, fewer = cached(copy, cache, "b", 2, "spread")  # examples 0 and 4 of 8: 4 is not stored
    assert fewer.calls == [["piqa"]]
    results, fewer = cached(copy, cache, "b", 2, "first")
    assert fewer.calls == [] and results["piqa"]["acc_norm_per_example"] == [1.0, 0.0]
    assert results["piqa"]["acc_norm"] == pytest.approx(0.5) and results["piqa"]["doc_ids"] == [0, 1]
    results, spread = cached(copy, cache, "b", 2, "spread")  # now stored
    assert spread.calls == [] and results["piqa"]["acc_norm_per_example"] == [SPLIT["piqa"][0], SPLIT["piqa"][4]]
    _, more = cached(copy, cache, "b", 8, "first")
    assert more.calls == [["piqa"]]
    results, whole = cached(copy, cache, "b", 3, "spread")  # examples 0, 2, 5: within the whole split, now stored
    assert whole.calls == [] and results["piqa"]["acc_norm_per_example"] == [SPLIT["piqa"][i] for i in (0, 2, 5)]

    # One weight changed by one ulp: another model, scored afresh.
    with torch.no_grad():
        copy.model.norm.weight[0] = torch.nextafter(copy.model.norm.weight[0], torch.tensor(2.0))
    _, changed = cached(copy, cache, "c", 4, "first")
    assert changed.calls == [["piqa"]]


def test_entries_written_before_doc_ids_hold_the_first_examples():
    model = tiny_model(0)
    key = {"weights": bench_zero_shot_gap.weights_fingerprint(model), "versions": bench_zero_shot_gap.scoring_versions()}
    cache = {"entries": [{**key, "checkpoint": "a", "task": "piqa", "limit": 6, "acc_norm_per_example": SPLIT["piqa"][:6]}]}
    results, scorer = cached(model, cache, "a", 3, "spread")  # examples 0, 2 and 5
    assert scorer.calls == [] and results["piqa"]["acc_norm_per_example"] == [SPLIT["piqa"][i] for i in (0, 2, 5)]
    _, scorer = cached(model, cache, "a", 4, "spread")  # examples 0, 2, 4 and 6: 6 was not scored
    assert scorer.calls == [["piqa"]]


def test_scores_from_other_library_versions_are_not_reused(monkeypatch):
    model, cache = tiny_model(0), {"entries": []}
    cached(model, cache, "a", None)
    monkeypatch.setattr(bench_zero_shot_gap, "scoring_versions", lambda: {"torch": "0", "transformers": "0", "lm_eval": "0"})
    _, other = cached(model, cache, "a", None)
    assert other.calls == [["piqa"]]


def test_a_spread_sample_is_evenly_spaced_over_the_split_and_the_first_n_are_not():
    # 10 of 100: every tenth; all of a split when the limit reaches its size; distinct and increasing however the
    # size divides.
    assert example_indices(100, 10) == list(range(0, 100, 10))
    assert example_indices(100, 10, "first") == list(range(10))
    assert example_indices(7, None) == example_indices(7, 9) == example_indices(7, 7, "first") == list(range(7))
    for size, limit in [(10042, 1000), (1838, 500), (570, 569), (13, 5)]:
        chosen = example_indices(size, limit)
        assert len(chosen) == limit and chosen == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] < size
        # Any stretch of the split holds its share of the sample, within one example.
        for begin, end in [(0, size // 3), (size // 3, size), (size // 4, 3 * size // 4)]:
            inside = sum(begin <= i < end for i in chosen)
            assert abs(inside - limit * (end - begin) / size) <= 1
    with pytest.raises(UpcycleError, match="unknown sample 'random': choose from spread, first"):
        example_indices(10, 5, "random")


def test_stored_scores_are_found_by_name_and_equal_those_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_zero_shot_gap, "task_size", lambda task: len(SPLIT[task]))
    cache = {"entries": []}
    scored, _ = cached(tiny_model(0), cache, "sparse", 4, "first", tasks=("piqa", "arc_easy"))
    cached(tiny_model(1), cache, "other", 8, "first")
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(cache))

    def stored(name, limit, sample="first", tasks=("piqa", "arc_easy")):
        return bench_zero_shot_gap.stored_scores(name, list(tasks), limit, sample, str(path))

    found = stored("sparse", 4)
    for task in ("piqa", "arc_easy"):
        assert found[task]["acc_norm_per_example"] == scored[task]["acc_norm_per_example"]
        assert found[task]["acc_norm"] == pytest.approx(scored[task]["acc_norm"])
    assert stored("sparse", 2)["piqa"]["acc_norm_per_example"] == SPLIT["piqa"][:2]  # among those stored
    assert stored("other", 3, "spread", tasks=("piqa",))["piqa"]["acc_norm_per_example"] == [SPLIT["piqa"][i] for i in (0, 2, 5)]

    with pytest.raises(SystemExit, match="no scores of a checkpoint named 'dense'. Names it holds: other, sparse"):
        stored("dense", 4)
    with pytest.raises(SystemExit, match="no scores of 'other' covering the examples asked for on every task"):
        stored("other", 4)  # arc_easy was never scored under that name
    with pytest.raises(SystemExit, match="no scores of 'sparse' covering"):
        stored("sparse", 8, tasks=("piqa",))  # piqa's examples 4-7 were not scored

    # A second model under the same name: refused where both cover the examples, used where only it does.
    cached(tiny_model(2), cache, "sparse", 8, "first")
    path.write_text(json.dumps(cache))
    with pytest.raises(SystemExit, match="2 different sets of weights under the name 'sparse'"):
        stored("sparse", 4, tasks=("piqa",))
    assert stored("sparse", 8, tasks=("piqa",))["piqa"]["acc_norm_per_example"] == SPLIT["piqa"]
