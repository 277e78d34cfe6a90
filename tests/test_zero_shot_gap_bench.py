"""`bench/bench_zero_shot_gap.py`'s rows against the paired-difference formulas written out by hand."""

import math
import statistics
import sys
from pathlib import Path

import pytest

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
