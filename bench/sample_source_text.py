"""Text sampled from the source model itself (SmolLM2-135M unless --source names another checkpoint), for use as a
calibration source that needs no data (as in LLM-QAT's data-free distillation): each sequence starts from one token
drawn uniformly from the tokenizer's vocabulary (special tokens excluded), then plain sampling at temperature 1 (no
top-k, no top-p), never stopping early.

    python bench/sample_source_text.py sampled.txt                      # 256 x 512 tokens, about 15 min on 2 cores
    python bench/bench_calibration.py --recipes 2 --extra-calibration sampled.txt
    python bench/sample_source_text.py sampled.txt --source my-llama     # any source gqe-upcycle reads

Sequences are separated by blank lines; the text is what the tokenizer decodes, special tokens left out.
"""

import argparse
import time

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
import torch

from convert.resources import SMOLLM2_GGUF, smollm2_folder
from convert.sources import load_source


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the text file to write")
    parser.add_argument("--source", help="checkpoint folder (default: the bundled SmolLM2-135M)")
    parser.add_argument("--gguf-file", help="GGUF file inside --source")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=512, help="tokens sampled per sequence")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.source is None:
        source, tokenizer = load_source(str(smollm2_folder()), SMOLLM2_GGUF)
    else:
        source, tokenizer = load_source(args.source, args.gguf_file)
        if tokenizer is None:
            parser.error(f"{args.source} has no tokenizer: sampling text needs one (add its tokenizer files).")
    source.eval()
    special = set(tokenizer.all_special_ids)
    # The tokenizer's ids only: embeddings are often padded past the tokenizer (Qwen2), rows that decode to nothing.
    vocabulary = min(len(tokenizer), source.config.vocab_size)
    first_tokens = torch.tensor([i for i in range(vocabulary) if i not in special])
    texts, start = [], time.time()
    for done in range(0, args.sequences, args.batch_size):
        batch = min(args.batch_size, args.sequences - done)
        prompt = first_tokens[torch.randint(len(first_tokens), (batch, 1))]
        with torch.no_grad():
            sampled = source.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=args.length, min_new_tokens=args.length, eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
        texts += tokenizer.batch_decode(sampled, skip_special_tokens=True)
        print(f"{done + batch} of {args.sequences} sequences, {time.time() - start:.0f} s", flush=True)
    with open(args.output, "w") as file:
        file.write("\n\n".join(texts))
    print(f"wrote {args.output}: {len(texts)} sequences, {sum(map(len, texts))} characters")


if __name__ == "__main__":
    main()
