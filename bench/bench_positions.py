"""Where in the window a conversion loses: perplexity relative to the source by token position.

The perplexity benchmarks score 512-token windows, each on its own; this splits each window's tokens into
position ranges (default 1-63, 64-255, 256-511: the scored positions, the first token having no prediction) and
reports, per domain and range, each checkpoint's perplexity as a ratio to the source's on the same tokens, with
the whole window's ratio last (what `gqe-eval` reports). A ratio that grows along the window means the loss is in
long-context attention, which a calibration or healing on shorter sequences never shows the model.

    python bench/bench_positions.py k2-converted k2-healed --json bench/results/positions.json

Checkpoints are folders (GQE or plain transformers); the source is the bundled SmolLM2-135M GGUF.
"""

import argparse
import math

import torch

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from common import report

from convert.data import load_token_blocks
from convert.evaluate import DOMAINS, check_domains, token_losses
from convert.resources import SMOLLM2_GGUF, smollm2_folder
from convert.sources import load_checkpoint, load_source


def mean_losses(losses: torch.Tensor, ranges: list[tuple[int, int]]) -> dict[str, float]:
    """Mean loss over each range of target positions [start, end) of `token_losses`' [n, T - 1] (column j scores
    position j + 1), named "start-(end - 1)", and over the whole window."""
    means = {f"{start}-{end - 1}": losses[:, start - 1 : end - 1].mean().item() for start, end in ranges}
    return {**means, "whole window": losses.mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders to compare with the source")
    parser.add_argument("--domains", nargs="+", default=DOMAINS)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    parser.add_argument("--boundaries", type=int, nargs="+", default=[64, 256],
                        help="positions where a new range starts")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sources = check_domains(args.domains)
    edges = [1, *args.boundaries, args.seq_len]
    if edges != sorted(set(edges)):
        parser.error(f"--boundaries must rise strictly within 2..{args.seq_len - 1}")
    ranges = [(start, end) for start, end in zip(edges, edges[1:])]  # target positions [start, end)

    source, tokenizer = load_source(str(smollm2_folder()), SMOLLM2_GGUF)
    models = {folder: load_checkpoint(folder)[0] for folder in args.checkpoints}
    columns = ["domain", "checkpoint", *[f"{start}-{end - 1}" for start, end in ranges], "whole window"]

    rows = []
    for domain in args.domains:
        blocks = load_token_blocks([sources[domain]], tokenizer, args.seq_len, args.seq_len,
                                   held_out_tokens=args.eval_tokens).held_out
        reference = mean_losses(token_losses(source, blocks), ranges)
        rows.append({"domain": domain, "checkpoint": "source (perplexity)",
                     **{key: math.exp(value) for key, value in reference.items()}})
        for folder, model in models.items():
            losses = mean_losses(token_losses(model, blocks), ranges)
            rows.append({"domain": domain, "checkpoint": f"{folder} (/ source)",
                         **{key: math.exp(value - reference[key]) for key, value in losses.items()}})
            print(rows[-1], flush=True)
    formats = {column: ".3f" for column in columns[2:]}
    report("Perplexity by position in the window, relative to the source", columns, rows, formats,
           json_path=args.json,
           notes=[f"{args.eval_tokens} held-out tokens per domain in {args.seq_len}-token windows; the source row is "
                  "perplexity, the others its ratio on the same tokens."])


if __name__ == "__main__":
    main()
