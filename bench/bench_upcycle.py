"""Upcycling SmolLM2-135M into sparse GQE: every domain and task, before and after healing, next to a dense control.

Rows: the source; its exact conversion (copies of every head: the same function, measured to show it); sparse
K = 2 and K = 1 (7 and 4 of 9 query-attention computations per token, shared head included) after conversion and
after healing on --heal-tokens tokens with `gqe-heal` (distillation from the source); and the dense control: the
source itself given the same fine-tune (same tokens in the same order, same loss, schedule and seed), since
healing also adapts a model to its training text. "healed GQE / healed control" is the cost of sparsity after
healing.

Calibration and healing read --data through the converter's data path (default: tinyshakespeare, WikiText-2 and
SciQ's science passages mixed equally, the fit parts only); every row is measured with `gqe-eval`'s pieces:
perplexity on each domain's held-out part (text no fit or heal saw) and zero-shot acc_norm through
lm-evaluation-harness.

    python bench/bench_upcycle.py --calibration-tokens 65536         # every row: about an hour on 2 idle CPU cores
    python bench/bench_upcycle.py --top-k 2 --no-exact --limit 100   # K = 2 and the control only
    python bench/bench_upcycle.py --data ../shared/data/tinyshakespeare.txt --domains shakespeare --tasks
    python bench/bench_upcycle.py --top-k 2 --no-exact --keep runs/   # keeps every checkpoint, e.g. for
                                                                      # bench_zero_shot_gap.py on more examples
"""

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from common import report

from convert.data import load_token_blocks
from convert.evaluate import SAMPLES, domain_perplexities, domain_sources, zero_shot
from convert.heal import distill, heal
from convert.layout import build_exact
from convert.resources import SMOLLM2_GGUF as GGUF, smollm2_folder
from convert.sources import load_checkpoint
from convert.upcycle import upcycle


def measure(model, tokenizer, args) -> dict:
    """Perplexity per domain and zero-shot acc_norm (in points) per task, with their average."""
    row = {f"ppl {domain}": ppl for domain, ppl in
           domain_perplexities(model, tokenizer, args.domains, args.eval_tokens, args.eval_window).items()}
    if args.tasks:
        scores = zero_shot(model, tokenizer, args.tasks, args.limit or None, sample=args.sample)
        row.update({task: 100 * scores[task]["acc_norm"] for task in args.tasks})
        row["zero-shot average"] = sum(row[task] for task in args.tasks) / len(args.tasks)
    return row


def display(row: dict, reference: dict | None, reference_name: str, args) -> dict:
    """The table's cells: perplexity with its ratio to the reference row, scores with their difference."""
    cells = {"checkpoint": row["checkpoint"]}
    for domain in args.domains:
        value = row[f"ppl {domain}"]
        ratio = f" ({value / reference[f'ppl {domain}']:.2f}x {reference_name})" if reference else ""
        cells[f"ppl {domain}"] = f"{value:.2f}{ratio}"
    for column in [*args.tasks, "zero-shot average"] if args.tasks else []:
        delta = f" ({row[column] - reference[column]:+.1f})" if reference else ""
        cells[column] = f"{row[column]:.1f}{delta}"
    return cells


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="*", help="calibration and healing sources (default: every domain, mixed "
                        "equally), as the converter takes them: PATH[,weight=W][,column=NAME]")
    parser.add_argument("--top-k", type=int, nargs="*", default=[2, 1], help="none (just the flag): no conversions")
    parser.add_argument("--heal-tokens", type=int, nargs="*", default=[100_000],
                        help="healing budgets; none (just the flag) for conversion only")
    parser.add_argument("--heal-learning-rate", type=float, default=1e-4,
                        help="peak learning rate of healing and of the dense control's fine-tune")
    parser.add_argument("--heal-epochs", type=int, default=1,
                        help="passes over the healing tokens, for healing and for the dense control's fine-tune")
    parser.add_argument("--heal-alpha", type=float, default=1.0,
                        help="weight of the distillation loss in healing and in the dense control's fine-tune "
                        "(1 - alpha: the LM loss)")
    parser.add_argument("--heal-trainable", default="all", choices=["all", "attention"],
                        help="parameters trained by healing and by the dense control's fine-tune")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--refine-epochs", type=int, default=0,
                        help="gqe-upcycle --refine-epochs: gradient refinement of each converted attention layer")
    parser.add_argument("--refine-learning-rate", type=float, default=1e-4)
    parser.add_argument("--refine-batch-size", type=int, default=8,
                        help="gqe-upcycle --refine-batch-size: calibration sequences per Adam step of the refinement")
    parser.add_argument("--source", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-source: skip the source row (already measured by an earlier run; rows then "
                        "carry no ratio to it)")
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the exact conversion (3 copies of each head)")
    parser.add_argument("--dense-control", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune the dense source with the healing recipe, for each healing budget")
    parser.add_argument("--domains", nargs="*", default=["shakespeare", "wikitext", "science"])
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain")
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--tasks", nargs="*", default=["piqa", "arc_easy", "hellaswag"], help="none: no zero-shot")
    parser.add_argument("--limit", type=int, default=200, help="examples per task (which ones: --sample); 0 for all")
    parser.add_argument("--sample", default="spread", choices=SAMPLES,
                        help="which --limit examples of each task: spread evenly over its split (as gqe-eval), or the "
                             "first ones (every figure recorded before 2026-12-05)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--keep", help="a new folder to keep every checkpoint in (k2, k2-healed-100000, "
                        "dense-control-100000, ...); by default they are written to a temporary folder and deleted")
    args = parser.parse_args()
    if args.keep and Path(args.keep).exists():
        parser.error(f"--keep {args.keep} exists; name a new folder, or delete that one first")

    src = str(smollm2_folder())
    data = args.data or [f"{spec},weight=1" for spec in domain_sources().values()]
    source, tokenizer = load_checkpoint(src, GGUF)
    rows = []
    passes = f" x {args.heal_epochs} passes" if args.heal_epochs > 1 else ""

    def add(name, model, started, **extra):
        rows.append({"checkpoint": name, **measure(model, tokenizer, args), **extra,
                     "minutes": round((time.time() - started) / 60, 1)})
        print(json.dumps(rows[-1]), flush=True)
        return rows[-1]

    source_row = add("SmolLM2-135M (source)", source, time.time()) if args.source else None
    if args.exact:
        add("exact (3 copies of each head)", build_exact(source, copies=3, noise=0.0, seed=0), time.time())
    if args.keep:
        Path(args.keep).mkdir(parents=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as work:
        for top_k in args.top_k:
            started, converted = time.time(), Path(work) / f"k{top_k}"
            upcycle(src, converted, mode="sparse", top_k=top_k, gguf_file=GGUF, calibration_data=data,
                    calibration_tokens=args.calibration_tokens, refine_epochs=args.refine_epochs,
                    refine_learning_rate=args.refine_learning_rate, refine_batch_size=args.refine_batch_size)
            add(f"K = {top_k}, converted", load_checkpoint(str(converted))[0], started)
            for tokens in args.heal_tokens:
                started, healed = time.time(), Path(work) / f"k{top_k}-healed-{tokens}"
                heal(str(converted), src, str(healed), data=data, gguf_file=GGUF, tokens=tokens,
                     learning_rate=args.heal_learning_rate, trainable=args.heal_trainable, epochs=args.heal_epochs,
                     alpha=args.heal_alpha)
                add(f"K = {top_k}, healed on {tokens} tokens{passes}", load_checkpoint(str(healed))[0], started,
                    healed_tokens=tokens)
    controls = {}
    if args.dense_control:
        for tokens in args.heal_tokens:
            started = time.time()
            train_ids = load_token_blocks(data, tokenizer, 256, tokens).fit  # exactly what gqe-heal trains on
            student = type(source)(source.config)
            student.load_state_dict(source.state_dict())
            with tempfile.TemporaryDirectory() as work:
                distill(student, source, train_ids, work, learning_rate=args.heal_learning_rate,
                        trainable=args.heal_trainable, epochs=args.heal_epochs, alpha=args.heal_alpha)
            if args.keep:
                for saved in (student, tokenizer):
                    saved.save_pretrained(Path(args.keep) / f"dense-control-{tokens}")
            controls[tokens] = add(f"dense control, tuned on {tokens} tokens{passes}", student, started, healed_tokens=tokens)

    # Converted rows against the source; healed rows against the dense control of the same budget.
    table = []
    for row in rows:
        control = controls.get(row.get("healed_tokens"))
        if control is row:
            table.append(display(row, source_row, "source", args))
        elif control is not None:
            table.append(display(row, control, "control", args))
        else:
            table.append(display(row, None if row is source_row else source_row, "source", args))
    columns = ["checkpoint", *[f"ppl {d}" for d in args.domains], *args.tasks,
               *(["zero-shot average"] if args.tasks else [])]
    examples = "all examples" if not args.limit else f"{args.limit} examples, " + (
        "spread evenly over the split" if args.sample == "spread" else "the first ones")
    report("Upcycling SmolLM2-135M into sparse GQE: every domain and task, before and after healing", columns, table,
           notes=[f"Calibration and healing data: {' '.join(data)} ({args.calibration_tokens} calibration tokens).",
                  f"Perplexity on {args.eval_tokens} held-out tokens per domain in {args.eval_window}-token windows; "
                  f"zero-shot acc_norm on {examples} of each task. Healed rows are "
                  "compared with the dense control of the same budget, the others with the source."])
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
