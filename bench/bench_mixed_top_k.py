"""k = 1 in some routed layers and k = 2 in the others, at the compute of k = 2 everywhere: a probe.

Keeping a band of layers dense (`--dense-layers 10-19`) meets most of issue 12's K = 2 figures, but attends more
query heads per token (230 of SmolLM2's 270) than k = 2 everywhere (210). Giving some of the other layers k = 1
(4 heads instead of 7) pays for the band. The model has one k for all its routed layers, so this probes the idea
before the model is given a k per layer: it takes a conversion with the band at k = 2 (BASE) and one with the same
band at k = 1 (DONOR), converted from the same source with the same recipe, and swaps DONOR's attention modules into
BASE at `--layers` (each module holds its own weights and config; bench_layer_costs.py swaps modules the same way).
DONOR's layers were fitted on the input its own k = 1 layers give, not BASE's: a small mismatch a model with a k
per layer, converted in one go, would not have. The model has had a k per layer since (`layer_num_experts_per_tok`,
`gqe-upcycle --layer-top-k 1:3,4`): this probe remains the way to choose the layers, from existing conversions.

Which layers: `--layers 0,3,...`, or `--choose N` with the single-layer costs of bench_layer_costs.py for both
(`--costs` DONOR's JSON, `--base-costs` BASE's or k = 2 everywhere's): the N routed layers whose k = 1 attention,
swapped alone into the source, adds the least loss beyond what their k = 2 attention adds, averaged over the
texts both files hold.

It scores the mixed model's perplexity on each domain's held-out text (gqe-eval's) and its zero-shot acc_norm per
example (gqe-eval's lm-eval path); with `--scores` the per-example scores join that file under `--name`, so that
`bench_zero_shot_gap.py --stored` pairs them with any checkpoint scored before.

    python bench/bench_mixed_top_k.py BASE DONOR (--layers 0,3 | --choose 7 --costs K1.json --base-costs K2.json)
                                      [--tasks piqa arc_easy hellaswag] [--limit 2000] [--sample spread]
                                      [--scores bench/results/zero_shot_scores.json --name NAME] [--json out.json]
"""

import argparse
import json
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from bench_layer_costs import converted_attention, mean_loss
from bench_zero_shot_gap import cached_scores
from common import report

from convert.evaluate import (DOMAINS, SAMPLES, TASKS, domain_perplexities, example_indices, task_size,
                              zero_shot)
from convert.sources import load_checkpoint


def attended_heads(module) -> int:
    """Query heads a layer's attention attends per token: the routed G*k plus the shared head, or a dense layer's
    all."""
    if hasattr(module, "top_k"):
        return module.num_groups * module.top_k + int(module.has_shared_head)
    return module.num_heads


def heads_per_token(model) -> int:
    return sum(attended_heads(layer.self_attn) for layer in model.model.layers)


def single_layer_costs(path: str) -> dict[str, list[float]]:
    """Per text, the loss each layer's converted attention adds alone (nats per token), from bench_layer_costs.py's
    JSON."""
    losses = json.loads(Path(path).read_text())["losses"]
    layers = sorted((key for key in losses if key.startswith("layer ")), key=lambda key: int(key.split()[1]))
    return {text: [mean_loss(losses[layer][text]) - mean_loss(pairs) for layer in layers]
            for text, pairs in losses["source"].items()}


def cheapest_layers(donor_costs: dict, base_costs: dict, candidates: list[int], count: int) -> list[int]:
    """The `count` layers of `candidates` where the donor's attention adds the least beyond the base's, averaged
    over the texts both hold."""
    texts = [text for text in donor_costs if text in base_costs]
    if not texts:
        raise SystemExit("the two cost files share no text; run bench_layer_costs.py on both with the same texts.")
    extra = {i: sum(donor_costs[t][i] - base_costs[t][i] for t in texts) / len(texts) for i in candidates}
    return sorted(sorted(candidates, key=lambda i: extra[i])[:count])


def routed_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "top_k")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the GQE conversion whose layers are kept (k = 2, say)")
    parser.add_argument("donor", help="a conversion of the same source whose attention is swapped in (k = 1, say)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--layers", help="the layers to take from the donor, comma-separated")
    chosen.add_argument("--choose", type=int, help="take this many layers, the cheapest by --costs and --base-costs")
    parser.add_argument("--costs", help="bench_layer_costs.py's JSON for the donor")
    parser.add_argument("--base-costs", help="bench_layer_costs.py's JSON for the base's kind of layer")
    parser.add_argument("--tasks", nargs="*", default=["piqa", "arc_easy", "hellaswag"], choices=list(TASKS))
    parser.add_argument("--limit", type=int, default=2000, help="examples per task (0: all)")
    parser.add_argument("--sample", default="spread", choices=SAMPLES)
    parser.add_argument("--domains", nargs="*", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--scores", help="per-example scores file (bench_zero_shot_gap.py's) to read and add to")
    parser.add_argument("--name", help="the name the mixed model's scores are stored under in --scores")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.choose is not None and not (args.costs and args.base_costs):
        parser.error("--choose ranks layers by their costs: give --costs and --base-costs.")
    if args.scores and not args.name:
        parser.error("--scores stores the mixed model's scores under a name: give --name.")

    base, tokenizer = load_checkpoint(args.base)
    donor, _ = load_checkpoint(args.donor)
    if len(base.model.layers) != len(donor.model.layers):
        raise SystemExit(f"{args.base} has {len(base.model.layers)} layers and {args.donor} "
                         f"{len(donor.model.layers)}: both must be conversions of the same source.")
    candidates = [i for i in routed_layers(base) if i in routed_layers(donor)]
    if args.layers:
        layers = sorted(int(index) for index in args.layers.split(","))
        if not set(layers) <= set(candidates):
            raise SystemExit(f"--layers {args.layers}: only layers routed in both can be swapped: {candidates}.")
    else:
        layers = cheapest_layers(single_layer_costs(args.costs), single_layer_costs(args.base_costs), candidates,
                                 args.choose)

    start = time.time()
    row = {"layers from the donor": ",".join(map(str, layers)), "heads per token, base": heads_per_token(base)}
    with converted_attention(base, donor, layers) as mixed:
        row["heads per token, mixed"] = heads_per_token(mixed)
        if args.domains:
            perplexities = domain_perplexities(mixed, tokenizer, args.domains, 8192, 512)
            row.update({f"ppl {domain}": value for domain, value in perplexities.items()})
        if args.tasks:
            limit = args.limit or None
            indices = {task: example_indices(task_size(task), limit, args.sample) for task in args.tasks}

            def score(missing):
                return zero_shot(mixed, tokenizer, missing, limit, per_example=True, sample=args.sample)

            cache = json.loads(Path(args.scores).read_text()) if args.scores else {"entries": []}
            results = cached_scores(mixed, indices, score, cache, args.name or "mixed", limit=limit,
                                    sample=args.sample)
            if args.scores:  # whole or not at all
                partial = Path(args.scores + ".partial")
                partial.write_text(json.dumps(cache))
                partial.replace(args.scores)
            row.update({task: 100 * results[task]["acc_norm"] for task in args.tasks})
    columns = list(row)
    formats = {column: ".2f" for column in columns if column.startswith("ppl") or column in args.tasks}
    report("k = 1 in some routed layers, swapped into a k = 2 conversion", columns, [row], formats,
           json_path=args.json,
           notes=[f"Base: {args.base}; donor: {args.donor}.",
                  f"{(time.time() - start) / 60:.1f} minutes scoring."])


if __name__ == "__main__":
    main()
