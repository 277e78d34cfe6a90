"""Prefill speed of GQE against dense GQA (transformers' own Llama) of the same shape, in one process.

Paper shape: hidden 1024, 16 query-head experts, 8 KV heads, head_dim 64, k = 1, variant "gqe": 8 routed +
1 shared = 9 of 16 query-attention computations per token (ceiling 16/9 = 1.78x on the attention alone).

For each context length, GQE and Llama are timed in alternation, --repeats pairs, reported as the median of
the per-pair ratios Llama time / GQE time, on three levels:
- kernel: the attention calls alone (SDPA on the tensors each model feeds it); ceiling 16/9 = 1.78x,
- attention: the whole attention module (projections, RoPE, router, gather, the attention call, slots, o_proj);
  its FLOP ceiling is lower, since the K/V/Q projections are nearly the same in both (column "FLOP ceiling"),
- model: a whole small model (--model-layers layers, up to --model-max-length tokens).
On a GPU the attention module is also timed replayed from a CUDA graph ("graphed" columns): a module of a few
dozen small ops launched one by one from Python is bound by the launches at short lengths, which a serving stack
(CUDA graphs, compiled generate) does not pay; the graphed time is the GPU's own.
Then a profile of one GQE attention prefill showing where its time goes (on a GPU: the kernels' time per op, for
both modules).

    python bench/bench_prefill.py                       # CPU, fp32, 1k to 16k
    python bench/bench_prefill.py --device cuda --dtype bfloat16 --lengths 4096 8192 16384 32768 \
        --backends sdpa flash_attention_2
"""

import argparse
from collections import defaultdict

import torch
from common import compare, report
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from modeling_gqe import GQEConfig, GQEForCausalLM
from modeling_gqe.modeling_gqe import GQEAttention


PAPER_SHAPE = dict(
    hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=64, intermediate_size=2816,
    vocab_size=32000, max_position_embeddings=65536,
)


def configs(layers: int, backend: str):
    gqe = GQEConfig(**PAPER_SHAPE, num_hidden_layers=layers, num_experts_per_tok=1, gqe_variant="gqe")
    llama = LlamaConfig(**PAPER_SHAPE, num_hidden_layers=layers)
    for config in (gqe, llama):
        config._attn_implementation = backend
    return gqe, llama


def module_flop_ceiling(length: int) -> float:
    """Llama / GQE multiply-adds per token of one attention module with causal prefill (keys seen: ~T/2)."""
    D, H, G, d = PAPER_SHAPE["hidden_size"], PAPER_SHAPE["num_attention_heads"], PAPER_SHAPE["num_key_value_heads"], PAPER_SHAPE["head_dim"]
    active = G * 1 + 1  # k = 1 routed per group + shared head
    per_head_attention = 2 * d * (length + 1) / 2  # QK^T and PV over the causal half
    llama = D * H * d + 2 * D * G * d + H * d * D + H * per_head_attention
    gqe = D * H * d + 2 * D * G * d + D * d + D * G * 2 + (G + 2) * d * D + active * per_head_attention
    return llama / gqe


def kernel_inputs(length, device, dtype):
    """The tensors the attention kernel sees: Llama's 16 query heads on 8 KV heads; GQE's one call of 8 routed
    heads plus the shared head on 8 KV heads plus the mean K/V head (k = 1: one query head per KV head)."""
    d, G, H = PAPER_SHAPE["head_dim"], PAPER_SHAPE["num_key_value_heads"], PAPER_SHAPE["num_attention_heads"]
    shape = lambda heads: torch.randn(1, heads, length, d, device=device, dtype=dtype)
    return shape(H), shape(G), shape(G), shape(G + 1), shape(G + 1), shape(G + 1)


def attention_inputs(model, length, device, dtype):
    hidden = torch.randn(1, length, PAPER_SHAPE["hidden_size"], device=device, dtype=dtype)
    position_ids = torch.arange(length, device=device)[None]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)
    return hidden, position_embeddings


def random_router(model):
    # A trained router is not uniform; give it random weights so routing decisions vary per token.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GQEAttention):
                module.router.weight.normal_(0, 0.05)


def build(layers, backend, device, dtype):
    gqe_config, llama_config = configs(layers, backend)
    torch.manual_seed(0)
    gqe = GQEForCausalLM(gqe_config)
    random_router(gqe)
    llama = LlamaForCausalLM(llama_config)
    return gqe.to(device, dtype).eval(), llama.to(device, dtype).eval()


@torch.no_grad()
def compare_kernels(length, device, dtype, repeats) -> tuple[float, float, float]:
    """The attention calls alone (see `kernel_inputs`): `compare`'s (GQE s, Llama s, speed-up)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q16, k8, v8, q9, k9, v9 = kernel_inputs(length, device, dtype)
    return compare(
        lambda: sdpa(q9, k9, v9, is_causal=True),
        lambda: sdpa(q16, k8, v8, is_causal=True, enable_gqa=True),
        device, repeats,
    )


@torch.no_grad()
def compare_attention(gqe, llama, length, device, dtype, repeats) -> tuple[float, float, float]:
    """The first layer's whole attention module of each model: `compare`'s (GQE s, Llama s, speed-up)."""
    gqe_attention, llama_attention = gqe.model.layers[0].self_attn, llama.model.layers[0].self_attn
    assert isinstance(gqe_attention, GQEAttention) and isinstance(llama_attention, LlamaAttention)
    hidden, position_embeddings = attention_inputs(gqe, length, device, dtype)
    return compare(
        lambda: gqe_attention(hidden, position_embeddings),
        lambda: llama_attention(hidden, position_embeddings),
        device, repeats,
    )


def graph_replay(fn, replays: int = 10):
    """`fn` captured in a CUDA graph (after warm-up runs on a side stream, as capture requires); returns a function
    replaying it `replays` times, so that one timed sample is well above the timer's resolution."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()

    def replay():
        for _ in range(replays):
            graph.replay()

    return replay


@torch.no_grad()
def compare_graphed_attention(gqe, llama, length, device, dtype, repeats) -> tuple[float, float, float]:
    """As `compare_attention`, each module replayed from a CUDA graph: seconds per forward."""
    gqe_attention, llama_attention = gqe.model.layers[0].self_attn, llama.model.layers[0].self_attn
    hidden, position_embeddings = attention_inputs(gqe, length, device, dtype)
    replays = 10
    gqe_s, llama_s, ratio = compare(
        graph_replay(lambda: gqe_attention(hidden, position_embeddings), replays),
        graph_replay(lambda: llama_attention(hidden, position_embeddings), replays),
        device, repeats,
    )
    return gqe_s / replays, llama_s / replays, ratio


def profile_kernels(attention, hidden, position_embeddings, top: int = 8) -> str:
    """GPU kernel time of one attention forward, in total and per aten op (the `top` largest), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        attention(hidden, position_embeddings)  # warm-up at this shape
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            attention(hidden, position_embeddings)
            torch.cuda.synchronize()
    ops = [event for event in prof.key_averages() if event.key.startswith("aten::") and event.self_device_time_total > 0]
    total = sum(event.self_device_time_total for event in ops)
    largest = sorted(ops, key=lambda event: -event.self_device_time_total)[:top]
    return f"{total:.0f} us in kernels: " + ", ".join(
        f"{event.key[6:]} {event.self_device_time_total:.0f} ({event.count}x)" for event in largest)


def profile_attention(attention, hidden, position_embeddings) -> dict[str, float]:
    """Share of one GQE attention prefill spent in each piece, from torch.profiler's CPU op times."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        attention(hidden, position_embeddings)  # warm-up at this shape
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        attention(hidden, position_embeddings)
    buckets = defaultdict(float)
    group_size = PAPER_SHAPE["num_attention_heads"] // PAPER_SHAPE["num_key_value_heads"]
    router_width = PAPER_SHAPE["num_key_value_heads"] * group_size
    for event in prof.key_averages(group_by_input_shape=True):
        name, shapes = event.key, event.input_shapes
        if name in ("aten::scaled_dot_product_attention", "aten::matmul") and shapes and len(shapes[0]) == 4:
            bucket = "attention (G*k routed + shared head, one call)"
        elif name == "aten::linear" and shapes and len(shapes) > 1 and shapes[1] and shapes[1][0] == router_width:
            bucket = "router (linear + softmax + top-k)"
        elif name in ("aten::softmax", "aten::_softmax", "aten::topk", "aten::max") and shapes and shapes[0] and shapes[0][-1] <= group_size:
            bucket = "router (linear + softmax + top-k)"
        elif name == "aten::gather":
            bucket = "gather selected queries"
        elif name == "aten::mean":
            bucket = "mean K/V for the shared head (new tokens only)"
        elif name == "aten::linear":
            bucket = "projections (q, k, v, q_shared, o)"
        else:
            continue
        buckets[bucket] += event.self_cpu_time_total
        if name in ("aten::scaled_dot_product_attention", "aten::linear", "aten::matmul"):
            buckets[bucket] += event.cpu_time_total - event.self_cpu_time_total
    total = prof.key_averages().self_cpu_time_total
    buckets["other (rope, cat, reshapes)"] = max(0.0, total - sum(buckets.values()))
    return {key: value / total for key, value in sorted(buckets.items(), key=lambda kv: -kv[1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-layers", type=int, default=2, help="layers of the whole-model comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", default=["sdpa"])
    parser.add_argument("--skip-model", action="store_true", help="attention module only")
    parser.add_argument("--model-max-length", type=int, default=8192, help="longest whole-model comparison")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows, notes = [], []
    for backend in args.backends:
        gqe, llama = build(args.model_layers, backend, device, dtype)
        for length in args.lengths:
            row = {"backend": backend, "tokens": length}
            gqe_s, llama_s, ratio = compare_kernels(length, device, dtype, args.repeats)
            row.update({"kernel GQE ms": gqe_s * 1e3, "kernel Llama ms": llama_s * 1e3, "kernel speed-up": ratio})
            gqe_s, llama_s, ratio = compare_attention(gqe, llama, length, device, dtype, args.repeats)
            row.update({"attention GQE ms": gqe_s * 1e3, "attention Llama ms": llama_s * 1e3,
                        "attention speed-up": ratio, "attention FLOP ceiling": module_flop_ceiling(length)})
            if device.type == "cuda":
                try:  # reported, not fatal: the other columns stand without it
                    gqe_s, llama_s, ratio = compare_graphed_attention(gqe, llama, length, device, dtype, args.repeats)
                    row.update({"graphed attention GQE ms": gqe_s * 1e3, "graphed attention Llama ms": llama_s * 1e3,
                                "graphed attention speed-up": ratio})
                except Exception as error:
                    notes.append(f"CUDA-graph timing at {length} tokens failed: {type(error).__name__}: {error}")
            if not args.skip_model and length <= args.model_max_length:
                input_ids = torch.randint(0, PAPER_SHAPE["vocab_size"], (1, length), device=device)
                with torch.no_grad():
                    gqe_s, llama_s, ratio = compare(
                        lambda: gqe.model(input_ids, use_cache=False),
                        lambda: llama.model(input_ids, use_cache=False),
                        device, args.repeats,
                    )
                row.update({"model GQE ms": gqe_s * 1e3, "model Llama ms": llama_s * 1e3, "model speed-up": ratio})
            rows.append(row)
            print(row, flush=True)
        if device.type == "cpu":
            for length in (args.lengths[0], args.lengths[-1]):
                hidden, position_embeddings = attention_inputs(gqe, length, device, dtype)
                shares = profile_attention(gqe.model.layers[0].self_attn, hidden, position_embeddings)
                notes.append(f"Where one GQE attention prefill spends its time ({backend}, {length} tokens): "
                             + ", ".join(f"{bucket} {share:.1%}" for bucket, share in shares.items()))
        elif device.type == "cuda":
            for length in (args.lengths[0], args.lengths[-1]):
                hidden, position_embeddings = attention_inputs(gqe, length, device, dtype)
                for name, model in (("GQE", gqe), ("Llama", llama)):
                    try:
                        profiled = profile_kernels(model.model.layers[0].self_attn, hidden, position_embeddings)
                    except Exception as error:
                        profiled = f"profile failed: {type(error).__name__}: {error}"
                    notes.append(f"{name} attention, {backend}, {length} tokens: {profiled}")
    columns = ["backend", "tokens", "kernel GQE ms", "kernel Llama ms", "kernel speed-up", "attention GQE ms",
               "attention Llama ms", "attention speed-up", "attention FLOP ceiling", "model GQE ms", "model Llama ms",
               "model speed-up"]
    if device.type == "cuda":
        columns[9:9] = ["graphed attention GQE ms", "graphed attention Llama ms", "graphed attention speed-up"]
    formats = {column: ".2f" for column in columns if column.endswith(" ms")}
    formats.update({column: ".2f" for column in columns if "speed-up" in column or "ceiling" in column})
    report(f"Prefill, paper shape: GQE vs Llama ({args.dtype}, median of {args.repeats} alternating pairs)", columns,
           rows, formats, json_path=args.json, device=device,
           notes=[f"Kernel ceiling {PAPER_SHAPE['num_attention_heads'] / 9:.2f}x (16 query heads vs 9)."] + notes)


if __name__ == "__main__":
    main()
