"""Where a sparse conversion loses HellaSwag's accuracy: a band of layers converted at a time, scored by the margin.

HellaSwag's acc_norm picks the ending with the highest log-likelihood per character; what an example's score depends
on is the margin between the gold ending and the best wrong one, not the gold ending's likelihood alone (which
bench_layer_costs.py measures, and which "Taking back the residual stream's drift" in RESULTS.md found to move
without the accuracy). This scores all four endings of each example, as lm-eval does (the context and the ending
tokenised together, the ending's tokens those after the context's), for the source, for the source with the
attention of one band of layers replaced by the converted checkpoint's (`--bands` equal bands), and for the
converted checkpoint itself. Per HellaSwag part it reports each variant's acc_norm, the change of the margin against
the source (nats per character, paired over examples), the loss it adds to the gold and to the wrong endings (nats
per token), and for the bands together the sum of their margin changes against the whole conversion's.

    python bench/bench_margin_bands.py CONVERTED [--baseline FOLDER --baseline-gguf-file NAME] [--examples 150]
                                       [--bands 3] [--within 10-19] [--parts wikihow] [--json out.json]

The examples: `--examples` of each part at each of bench_layer_costs' two shifts (0 and 0.5), so 2 x 150 per part
by default, spread over the part within gqe-eval's spread sample of 2000. `--within A-B` splits only layers A to B
into the bands (`--within 10-19 --bands 10`: each of those layers alone); `--bands 0` scores the source and the whole
conversion only (a screen of a conversion, to pair with another's through the stored log-likelihoods); `--parts`
scores one part only. One forward pass of the four endings per example and variant: about 5 minutes per variant for
SmolLM2-135M on 2 CPU threads at the defaults (3 for WikiHow's part alone).
"""

import argparse
import json
import time

import torch

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from bench_layer_costs import (HELLASWAG_PARTS, add_checkpoint_arguments, converted_attention, hellaswag_docs,
                               load_source_and_conversion)
from common import report


SHIFTS = (0.0, 0.5)  # bench_layer_costs' two disjoint samples, together


def hellaswag_examples(tokenizer, examples: int, parts=HELLASWAG_PARTS) -> dict[str, list[dict]]:
    """Per part: `examples` examples at each shift, each as context ids, the four endings' ids (lm-eval's split of
    the jointly tokenised context and ending), the endings' lengths in characters (acc_norm's divisor) and gold."""
    result = {}
    for part, docs in hellaswag_docs(examples, SHIFTS, parts).items():
        result[part] = []
        for doc in docs:
            context = tokenizer(doc["query"])["input_ids"]
            endings = [tokenizer(doc["query"] + " " + choice)["input_ids"][len(context) :] for choice in doc["choices"]]
            result[part].append({"context": context, "endings": endings,
                                 "characters": [len(choice) for choice in doc["choices"]], "gold": doc["gold"]})
    return result


@torch.no_grad()
def ending_log_likelihoods(model, parts) -> dict[str, list[list[float]]]:
    """Per part and example, each ending's summed log-likelihood given the context. The four sequences go in one
    batch, right-padded: a causal model's logits at the real positions do not read the padding after them."""
    result = {}
    for part, examples in parts.items():
        result[part] = []
        for example in examples:
            context = example["context"]
            sequences = [context + ending for ending in example["endings"]]
            width = max(map(len, sequences))
            batch = torch.tensor([sequence + [0] * (width - len(sequence)) for sequence in sequences])
            logits = model(batch, use_cache=False).logits.float()  # [4, T, V]
            scores = []
            for row, ending in enumerate(example["endings"]):
                predicted = logits[row, len(context) - 1 : len(context) - 1 + len(ending)]
                loss = torch.nn.functional.cross_entropy(predicted, torch.tensor(ending), reduction="sum")
                scores.append(-loss.item())
            result[part].append(scores)
    return result


def margins(examples, scores) -> list[float]:
    """Per example: gold ending's log-likelihood per character minus the best wrong ending's (> 0: acc_norm right)."""
    out = []
    for example, lls in zip(examples, scores):
        normalised = [ll / characters for ll, characters in zip(lls, example["characters"])]
        gold = example["gold"]
        out.append(normalised[gold] - max(value for j, value in enumerate(normalised) if j != gold))
    return out


def added_losses(examples, scores, source_scores) -> tuple[list[float], list[float]]:
    """Per example: the loss per token the variant adds to the gold ending, and to the wrong ones (their mean)."""
    gold_added, wrong_added = [], []
    for example, lls, source_lls in zip(examples, scores, source_scores):
        per_token = [(source - variant) / len(ending)
                     for variant, source, ending in zip(lls, source_lls, example["endings"])]
        gold = example["gold"]
        gold_added.append(per_token[gold])
        wrong_added.append(sum(value for j, value in enumerate(per_token) if j != gold) / (len(per_token) - 1))
    return gold_added, wrong_added


def mean_and_error(values) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def layer_bands(first: int, last: int, bands: int, count: int) -> list[range]:
    """Layers `first` to `last` split into `bands` equal bands, in order. A band that holds all `count` layers is
    left out: it is the whole conversion, which is always scored ("all layers")."""
    width = last - first + 1
    split = [range(first + width * b // bands, first + width * (b + 1) // bands) for b in range(bands)]
    return [band for band in split if len(band) < count]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--examples", type=int, default=150, help="HellaSwag examples of each part at each shift")
    parser.add_argument("--bands", type=int, default=3,
                        help="equal bands of layers converted one at a time (0: the whole conversion only)")
    parser.add_argument("--within", help="FIRST-LAST: the layers split into bands (default: all of them)")
    parser.add_argument("--parts", nargs="+", choices=HELLASWAG_PARTS, default=list(HELLASWAG_PARTS),
                        help="HellaSwag parts scored")
    parser.add_argument("--json", help="also write the results (with every ending's log-likelihood) here")
    args = parser.parse_args()

    source, converted, tokenizer, described = load_source_and_conversion(args)
    count = len(source.model.layers)
    first, last = 0, count - 1
    if args.within:
        try:
            first, last = map(int, args.within.split("-"))
        except ValueError:
            parser.error(f"--within {args.within!r}: give the first and last layer as FIRST-LAST, e.g. 10-19.")
        if not 0 <= first <= last < count:
            parser.error(f"--within {args.within}: layers between 0 and {count - 1}, the first not after the last.")
    width = last - first + 1
    if not 0 <= args.bands <= width:
        parser.error(f"--bands {args.bands}: between 0 (the whole conversion only) and the {width} layers split.")
    parts = hellaswag_examples(tokenizer, args.examples, args.parts)

    start = time.time()
    bands = layer_bands(first, last, args.bands, count)
    band_names = [f"layer {band[0]}" if len(band) == 1 else f"layers {band[0]}-{band[-1]}" for band in bands]
    scores = {"source": ending_log_likelihoods(source, parts)}
    for band, name in zip(bands, band_names):
        with converted_attention(source, converted, band) as band_converted:
            scores[name] = ending_log_likelihoods(band_converted, parts)
        print(f"{name} done, {time.time() - start:.0f} s", flush=True)
    scores["all layers"] = ending_log_likelihoods(converted, parts)

    rows = []
    for part, examples in parts.items():
        source_margins = margins(examples, scores["source"][part])
        band_changes = []
        for variant in ["source", *band_names, "all layers"]:
            variant_margins = margins(examples, scores[variant][part])
            accuracy = 100 * sum(m > 0 for m in variant_margins) / len(examples)
            row = {"part": part, "variant": variant, "examples": len(examples), "acc_norm": accuracy}
            if variant != "source":
                change = [m - s for m, s in zip(variant_margins, source_margins)]
                if variant in band_names:
                    band_changes.append(change)
                accuracy_change = [100 * ((m > 0) - (s > 0)) for m, s in zip(variant_margins, source_margins)]
                gold_added, wrong_added = added_losses(examples, scores[variant][part], scores["source"][part])
                for name, values in (("acc_norm change", accuracy_change), ("margin change", change),
                                     ("gold added", gold_added), ("wrong added", wrong_added)):
                    row[name], row[f"{name} stderr"] = mean_and_error(values)
            rows.append(row)
        if len(band_changes) > 1:
            summed = [sum(values) for values in zip(*band_changes)]
            row = {"part": part, "variant": "bands summed", "examples": len(examples)}
            row["margin change"], row["margin change stderr"] = mean_and_error(summed)
            rows.append(row)
    columns = ["part", "variant", "examples", "acc_norm", "acc_norm change", "acc_norm change stderr", "margin change",
               "margin change stderr", "gold added", "gold added stderr", "wrong added", "wrong added stderr"]
    formats = {column: ".4f" for column in columns[4:]}
    formats.update({"acc_norm": ".1f", "acc_norm change": ".2f", "acc_norm change stderr": ".2f"})
    report("HellaSwag's acc_norm margin: a band of layers converted at a time, against all of them", columns, rows,
           formats, json_path=args.json,
           notes=[described,
                  "margin: gold ending's log-likelihood per character minus the best wrong ending's (acc_norm's "
                  "choice); its change is the variant's against the source's, paired, in nats per character; "
                  "added: nats per token over the source, on the gold ending and on the wrong ones (their mean).",
                  f"HellaSwag examples per part: {args.examples} at each shift {list(SHIFTS)}; "
                  f"{(time.time() - start) / 60:.1f} minutes scoring."])
    if args.json:  # every ending's log-likelihood (to 1e-4 nats), to split or bootstrap differently later
        with open(args.json) as file:
            results = json.load(file)
        results["log_likelihoods"] = {variant: {part: [[round(ll, 4) for ll in lls] for lls in examples]
                                                for part, examples in texts.items()}
                                      for variant, texts in scores.items()}
        with open(args.json, "w") as file:
            json.dump(results, file, separators=(",", ":"))


if __name__ == "__main__":
    main()
