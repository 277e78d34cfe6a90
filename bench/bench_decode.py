"""Generation speed of GQE against the dense model it replaces, in one process: decode, compiled static-cache
generation, prefill peak memory and training steps.

1. Decode, paper shape (hidden 1024, 16 experts / Llama heads, 8 KV heads, head_dim 64, k = 1, "gqe", 4 layers,
   vocab 32000) against transformers' LlamaForCausalLM of the same shape: greedy decode steps after a prefill of
   512, 2k and 8k tokens, batch 1, fp32, sdpa, DynamicCache. Each timed run decodes --steps tokens, then crops
   the cache back, so every run starts from the same cache.
2. The same for SmolLM2-135M (the bundled GGUF, dequantised) against its sparse K = 2 conversion.
3. `generate(..., cache_implementation="static")` with `torch.compile(model.forward, fullgraph=True)`.
4. Peak memory of an 8k prefill as `generate` runs it (cache on, logits of the last token only), each model in a
   fresh process: peak RSS during the forward minus RSS before.
5. Training steps (forward, backward, AdamW) at 512 and 2k tokens, batch 2, paper shape.
6. The query projection alone, on one layer of the paper shape with a random router: the model's dense
   projection of all 16 experts followed by a gather of the 8 selected, against projecting only the selected
   experts' rows: gathering each token's weight rows, and sorting the tokens by expert with one GEMM per expert
   (a loop of `torch.mm`, and one `F.grouped_mm`). Each is timed against Llama's q_proj (16 heads) on the same
   input; reading or multiplying only the selected rows would halve it.

Ratios are dense time / GQE time (> 1: GQE is faster), medians of alternating pairs (bench/common.py). Decode
on a CPU reads every weight and the whole KV cache once per token, so it is bound by memory traffic; the
"ceiling" column is dense bytes / GQE bytes per decoded token (`decode_bytes`), the best ratio any
implementation of these two models can reach there.

Parts run in the order decode, smollm2, memory, training, projection, static (the one that compiles, last);
`--json` rewrites its file after each part, so a part that fails keeps what the earlier ones measured.

    python bench/bench_decode.py                    # everything (about 25 minutes on 2 CPU cores)
    python bench/bench_decode.py --parts decode     # one part: decode, smollm2, static, memory, training, projection
    python bench/bench_decode.py --device cuda --dtype bfloat16 --parts decode static memory training projection

On a GPU, peak memory is the allocator's peak (torch.cuda.max_memory_allocated) rather than the process's
resident memory, and the SmolLM2 part is not available (its bundled GGUF is a CPU-side package).
"""

import argparse
import json
import os
import subprocess
import sys

import common
import torch
from common import compare, report
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import torch.nn.functional as F

from modeling_gqe import GQEConfig, GQEForCausalLM
from modeling_gqe.modeling_gqe import CACHE_ARG  # `cache` from transformers 5.24, `past_key_values` before


PAPER_SHAPE = dict(
    hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=64, intermediate_size=2816,
    vocab_size=32000, max_position_embeddings=65536, num_hidden_layers=4,
)
CPU = torch.device("cpu")


def paper_models(backend: str = "sdpa", device: torch.device = CPU, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    gqe = GQEForCausalLM(GQEConfig(**PAPER_SHAPE, num_experts_per_tok=1, gqe_variant="gqe"))
    with torch.no_grad():  # a trained router is not uniform: random routing decisions per token
        for layer in gqe.model.layers:
            layer.self_attn.router.weight.normal_(0, 0.05)
    llama = LlamaForCausalLM(LlamaConfig(**PAPER_SHAPE))
    for model in (gqe, llama):
        model.set_attn_implementation(backend)
    return gqe.to(device, dtype).eval(), llama.to(device, dtype).eval()


def smollm2_models(calibration_tokens: int = 4096):
    """SmolLM2-135M and its sparse K = 2 conversion (speed does not depend on the fit's quality, so a small
    calibration budget is used)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from convert.resources import SHAKESPEARE, SMOLLM2_GGUF, data_file, smollm2_folder
    from convert.sources import load_source
    from convert.upcycle import upcycle

    src = str(smollm2_folder())
    source, _ = load_source(src, SMOLLM2_GGUF)
    dense = type(source)(source.config)  # a plain Llama: the GGUF-loaded one carries a quantized flag
    dense.load_state_dict(source.state_dict())
    with tempfile.TemporaryDirectory() as work:
        upcycle(src, f"{work}/k2", mode="sparse", top_k=2, gguf_file=SMOLLM2_GGUF,
                calibration_file=str(data_file(SHAKESPEARE)), calibration_tokens=calibration_tokens, held_out_tokens=0)
        gqe = AutoModelForCausalLM.from_pretrained(f"{work}/k2", trust_remote_code=True)
    return gqe.eval(), dense.eval()


def decode_bytes(model, cache_len: int, dynamic_cache: bool = True) -> float:
    """Bytes moved per decoded token (batch 1): every weight but the embedding once, plus the KV cache read by
    attention, plus (DynamicCache) the cache copied by its concatenation, read and written."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if config.tie_word_embeddings:
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv_heads = config.num_key_value_heads + (1 if getattr(config, "gqe_variant", None) == "gqe" else 0)
    cache_element_size = next(model.parameters()).element_size()  # the cache holds the model's dtype
    cache = config.num_hidden_layers * 2 * kv_heads * cache_len * config.head_dim * cache_element_size
    return weights + cache * (3 if dynamic_cache else 1)


def decode_runner(model, cache_len: int, steps: int):
    """A function decoding `steps` greedy tokens after a fixed prefill of `cache_len` tokens, then restoring it."""
    generator = torch.Generator().manual_seed(cache_len)
    prompt = torch.randint(0, model.config.vocab_size, (1, cache_len), generator=generator).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(prompt, **{CACHE_ARG: cache}).logits[:, -1:].argmax(-1)

    def run():
        token = first
        with torch.no_grad():
            for _ in range(steps):
                token = model(token, **{CACHE_ARG: cache}).logits[:, -1:].argmax(-1)
        cache.crop(-steps)

    return run


def decode_rows(gqe, dense, lengths, steps, repeats, dense_name):
    rows = []
    for length in lengths:
        gqe_s, dense_s, ratio = compare(decode_runner(gqe, length, steps), decode_runner(dense, length, steps),
                                        gqe.device, repeats, warmup=1)
        rows.append({"cache length": length, "GQE tokens/s": steps / gqe_s, f"{dense_name} tokens/s": steps / dense_s,
                     "speed-up": ratio, "memory-traffic ceiling": decode_bytes(dense, length) / decode_bytes(gqe, length)})
        print(rows[-1], flush=True)
    return rows


def static_generate_rows(gqe, dense, lengths, new_tokens, repeats, dense_name):
    """generate(cache_implementation="static") with each model's forward compiled (fullgraph), after a warm-up
    that compiles both shapes (prefill and one-token decode). On a GPU, `generate` compiles the decoding forward
    itself (CUDA graphs, its default `CompileConfig`) when the cache is static, so the models are left as they are."""
    rows = []
    models = {"gqe": gqe, "dense": dense}
    if gqe.device.type == "cpu":  # generate compiles only on accelerators
        for model in models.values():
            model.forward = torch.compile(model.forward, fullgraph=True)
    for length in lengths:
        prompt = torch.randint(0, gqe.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        prompt = prompt.to(gqe.device)

        def runner(model):
            def run():
                with torch.no_grad():
                    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   cache_implementation="static", pad_token_id=0)
            return run

        gqe_s, dense_s, ratio = compare(runner(models["gqe"]), runner(models["dense"]), gqe.device, repeats, warmup=2)
        rows.append({"prompt": length, "new tokens": new_tokens, "GQE tokens/s": new_tokens / gqe_s,
                     f"{dense_name} tokens/s": new_tokens / dense_s, "speed-up (whole generate)": ratio})
        print(rows[-1], flush=True)
    for model in models.values():  # back to eager: drop the instance attribute, the class's forward shows again
        model.__dict__.pop("forward", None)
    return rows


def prefill_peak_memory(which: str, length: int, dtype: str = "float32") -> float:
    """MiB: peak resident memory during one prefill forward of `length` tokens, above the resident memory before
    it, measured in a fresh process so that nothing else's peak counts."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, 'bench'); import bench_decode as b; "
        # built in the benchmark's dtype, so no float32 copy sets the process's peak before the forward
        "dtype = getattr(torch, sys.argv[3]); torch.set_default_dtype(dtype); "
        "gqe, llama = b.paper_models(dtype=dtype); "
        "model = gqe if sys.argv[1] == 'gqe' else llama; "
        "ids = torch.randint(0, 32000, (1, int(sys.argv[2]))); "
        "before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20; "
        "torch.no_grad().__enter__(); model(ids, use_cache=True, logits_to_keep=1); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)"
    )
    done = subprocess.run([sys.executable, "-c", code, which, str(length), dtype], capture_output=True, text=True,
                          cwd=common.REPO_ROOT, env={**os.environ, "PYTHONPATH": str(common.REPO_ROOT)})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def prefill_peak_memory_gpu(model, length: int) -> float:
    """MiB: the CUDA allocator's peak during one prefill forward of `length` tokens, above what was allocated
    before it (the weights)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    torch.cuda.synchronize(model.device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize(model.device)
    return (torch.cuda.max_memory_allocated(model.device) - before) / 2**20


def training_rows(lengths, repeats, batch_size=2, device=CPU, dtype=torch.float32):
    rows = []
    gqe, llama = paper_models(device=device, dtype=dtype)
    for length in lengths:
        batch = torch.randint(0, PAPER_SHAPE["vocab_size"], (batch_size, length), generator=torch.Generator().manual_seed(1))
        batch = batch.to(device)
        steps = {}
        for name, model in (("gqe", gqe), ("llama", llama)):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

            def step(model=model, optimizer=optimizer):
                model.train()
                model(batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[name] = step
        gqe_s, llama_s, ratio = compare(steps["gqe"], steps["llama"], device, repeats, warmup=1)
        rows.append({"tokens": length, "batch": batch_size, "GQE step s": gqe_s, "Llama step s": llama_s, "speed-up": ratio})
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------- query projection
# Ways to get the selected experts' queries [T, G*k, d] from hidden [T, D] and the router's picks [T, G, k]
# (expert index within the group). All give the same numbers (checked before timing).


def dense_then_gather(attn, hidden, top_index):
    """What the model does (`GQEAttention.selected_queries`): every expert's query, then the selected ones."""
    return attn.selected_queries(hidden[None], top_index[None])[0]


def global_expert_index(attn, top_index):
    group_start = torch.arange(0, attn.num_groups * attn.experts_per_group, attn.experts_per_group,
                               device=top_index.device)
    return (top_index + group_start[:, None]).flatten(1)  # [T, G*k]


def gather_weight_rows(attn, hidden, top_index):
    """Only the selected experts' rows are multiplied, after copying them out per token: [T, G*k, d, D]."""
    rows = attn.q_proj.weight.view(-1, attn.head_dim, hidden.shape[-1])[global_expert_index(attn, top_index)]
    return torch.einsum("tD,tsdD->tsd", hidden, rows)


def sorted_loop_of_gemms(attn, hidden, top_index):
    """Only the selected experts' rows are multiplied: the (token, slot) pairs sorted by expert, the tokens'
    hidden rows gathered in that order, a `torch.mm` per expert, the results put back in place."""
    expert = global_expert_index(attn, top_index)
    slots, d = expert.shape[1], attn.head_dim
    order = expert.reshape(-1).argsort(stable=True)
    gathered = hidden.index_select(0, order // slots)  # [T*G*k, D]
    weight = attn.q_proj.weight.view(-1, d, hidden.shape[-1])
    out, start = gathered.new_empty(gathered.shape[0], d), 0
    for e, count in enumerate(torch.bincount(expert.reshape(-1), minlength=weight.shape[0]).tolist()):
        torch.mm(gathered[start : start + count], weight[e].T, out=out[start : start + count])
        start += count
    result = torch.empty_like(out)
    result[order] = out
    return result.view(-1, slots, d)


def sorted_grouped_gemm(attn, hidden, top_index):
    """The same sorted by expert, with one grouped GEMM (`F.grouped_mm`, torch >= 2.10) instead of the loop."""
    expert = global_expert_index(attn, top_index)
    slots, d = expert.shape[1], attn.head_dim
    flat = expert.reshape(-1)
    order = flat.argsort(stable=True)
    weight = attn.q_proj.weight.view(-1, d, hidden.shape[-1])
    offsets = torch.bincount(flat, minlength=weight.shape[0]).cumsum(0).to(torch.int32)
    out = F.grouped_mm(hidden.index_select(0, order // slots), weight.transpose(1, 2), offs=offsets)
    return torch.empty_like(out).index_copy_(0, order, out).view(-1, slots, d)


def projection_rows(token_counts, repeats, device=CPU, dtype=torch.float32):
    gqe, llama = paper_models(device=device, dtype=dtype)
    attn, llama_q_proj = gqe.model.layers[0].self_attn, llama.model.layers[0].self_attn.q_proj
    strategies = {"dense + gather (the model)": dense_then_gather, "gather weight rows": gather_weight_rows,
                  "sorted, loop of GEMMs": sorted_loop_of_gemms, "sorted, grouped GEMM": sorted_grouped_gemm}
    rows = []
    # the strategies sum the same products in different orders: fp32 agrees to 1e-4, half precision to its rounding
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        for tokens in token_counts:
            hidden = torch.randn(tokens, PAPER_SHAPE["hidden_size"], device=device, dtype=dtype)
            _, _, top_index = attn.router(hidden)  # [T, G, k]
            reference = dense_then_gather(attn, hidden, top_index)
            row = {"tokens": tokens}
            for name, strategy in strategies.items():
                if "weight rows" in name and tokens > 64:
                    continue  # copies T x 512 x 1024 weights: only for a few tokens
                try:
                    result = strategy(attn, hidden, top_index)
                except (RuntimeError, NotImplementedError) as error:  # e.g. grouped_mm without a kernel for this dtype
                    print(f"{name}: not available here ({str(error).splitlines()[0]})", flush=True)
                    continue
                torch.testing.assert_close(result, reference, **tolerance)
                gqe_s, llama_s, ratio = compare(lambda: strategy(attn, hidden, top_index),
                                                lambda: llama_q_proj(hidden), device, repeats)
                row[f"{name} µs"] = gqe_s * 1e6
                row[f"{name}: Llama / it"] = ratio
            row["Llama q_proj µs"] = llama_s * 1e6
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["decode", "smollm2", "static", "memory", "training", "projection"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write all results here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if "smollm2" in args.parts and (device.type != "cpu" or dtype != torch.float32):
        parser.error("--parts smollm2 runs on the CPU in float32 only (the bundled GGUF is dequantised there); "
                     "leave it out of --parts for --device/--dtype runs")
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    formats = {"GQE tokens/s": ".2f", "Llama tokens/s": ".2f", "SmolLM2 tokens/s": ".2f", "speed-up": ".3f",
               "memory-traffic ceiling": ".3f", "speed-up (whole generate)": ".3f", "GQE step s": ".3f",
               "Llama step s": ".3f"}
    where = f"{device.type}, {args.dtype}"

    def section(key, title, rows, row_formats=formats):
        results[key] = rows
        columns = list(dict.fromkeys(column for row in rows for column in row))
        report(f"{title} ({where})", columns, rows, row_formats, device=device)
        if args.json:  # after every part, so that a part that fails later loses nothing measured before it
            with open(args.json, "w") as handle:
                json.dump({"machine": common.machine(device), "command": common.command_line(), **results}, handle,
                          indent=2)

    if "decode" in args.parts or "static" in args.parts or "memory" in args.parts:
        gqe, llama = paper_models(device=device, dtype=dtype)
    if "decode" in args.parts:
        section("decode", "Decode, paper shape: GQE vs Llama (DynamicCache, batch 1)",
                decode_rows(gqe, llama, args.lengths, args.steps, args.repeats, "Llama"))
    if "smollm2" in args.parts:
        smol_gqe, smol = smollm2_models()
        rows = decode_rows(smol_gqe, smol, [length for length in args.lengths if length <= 2048], args.steps,
                           args.repeats, "SmolLM2")
        section("smollm2", "Decode, SmolLM2-135M sparse K = 2 vs SmolLM2-135M (DynamicCache, batch 1)", rows)
    if "memory" in args.parts:
        length = max(args.lengths)
        if device.type == "cuda":
            row = {"prefill tokens": length, "GQE peak MiB": prefill_peak_memory_gpu(gqe, length),
                   "Llama peak MiB": prefill_peak_memory_gpu(llama, length)}
        else:
            row = {"prefill tokens": length, "GQE peak MiB": prefill_peak_memory("gqe", length, args.dtype),
                   "Llama peak MiB": prefill_peak_memory("llama", length, args.dtype)}
        row["Llama / GQE"] = row["Llama peak MiB"] / row["GQE peak MiB"]
        section("memory", "Prefill peak memory, paper shape", [row],
                {"GQE peak MiB": ".0f", "Llama peak MiB": ".0f", "Llama / GQE": ".2f"})
    if "training" in args.parts:
        section("training", "Training step (forward, backward, AdamW), paper shape",
                training_rows([512, 2048], args.repeats, device=device, dtype=dtype))
    if "projection" in args.parts:
        rows = projection_rows([1, 4, 8, 16, 64, 512, 8192], args.repeats, device=device, dtype=dtype)
        columns = list(dict.fromkeys(column for row in rows for column in row))
        section("projection", "The query projection alone, one layer of the paper shape (Llama / GQE per strategy)",
                rows, {column: ".0f" if column.endswith("µs") else ".2f" for column in columns if column != "tokens"})
    if "static" in args.parts:  # last: it compiles the models' forwards
        section("static", "generate(cache_implementation='static') with a compiled forward, paper shape",
                static_generate_rows(gqe, llama, [512, 2048], 32, max(3, args.repeats // 2), "Llama"))


if __name__ == "__main__":
    main()
