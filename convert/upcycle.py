"""Upcycle a GQA checkpoint (Llama, Mistral, Qwen2, SmolLM) into Grouped Query Experts.

    gqe-upcycle SRC OUT --mode exact  [--copies C] [--noise S]
    gqe-upcycle SRC OUT --mode sparse [--top-k K] [--calibration-file TXT]

Source heads: H query heads in G KV groups, r = H / G per group, head size d.

exact   Every source query head becomes one slot whose experts are C copies of it (partitioned routing, k = r,
        M = C * r). Routers start at zero, the weighted and shared slots start with a zero output projection,
        so the converted model computes exactly the source's function (checked after writing). `--noise S`
        perturbs the copies (relative std S) to break their symmetry before training.
sparse  Each source head is an expert (M = r) and the router picks K < r of them per group (ranked), plus the
        shared head: G*K + 1 query-attention computations instead of H. Slot output projections, the shared
        head and the routers are fitted on calibration text, layer by layer, so that each converted attention
        layer reproduces the source layer's output as closely as a linear fit allows (see `calibrate.py`).

The output folder is written into a temporary sibling and renamed into place only when complete.
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_gqe import GQEConfig, GQEForCausalLM


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UpcycleError(ValueError):
    """A problem with the converter's input, with the fix in its message."""


@dataclass
class UpcycleOptions:
    mode: str = "exact"
    copies: int = 2
    noise: float = 0.0
    top_k: int | None = None
    calibration_file: str | None = None
    calibration_tokens: int = 16384
    held_out_tokens: int = 8192
    gguf_file: str | None = None
    dtype: str = "float32"
    force: bool = False
    check_sequences: int = 4
    seed: int = 0


# --------------------------------------------------------------------------------------------------- sources


def load_source(src: str, gguf_file: str | None = None):
    """Load a source checkpoint in fp32, refusing what the converter cannot carry. Returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(src)
    if path.exists():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise UpcycleError(f"{path / gguf_file} does not exist: --gguf-file names a file inside SRC.")
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds {ggufs}: pass --gguf-file {ggufs[0]}." if ggufs else ""
            raise UpcycleError(f"{path} has no config.json: SRC must be a Transformers checkpoint folder.{hint}")
    elif src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UpcycleError(f"{src} does not exist: give a checkpoint folder or a hub id (owner/name).")

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except OSError as error:
        where = "the folder" if path.exists() else "no local folder of that name, and the hub"
        raise UpcycleError(f"cannot read the config of {src} ({where}): {str(error).splitlines()[0]}") from error
    check_source_config(config)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # tiny test checkpoints carry none; the converted folder then has none either
    return model, tokenizer


def check_source_config(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UpcycleError(
            f"unsupported source model_type {model_type!r}: gqe-upcycle converts {', '.join(SUPPORTED_MODEL_TYPES)} "
            "checkpoints (SmolLM and Llama 3 are 'llama'). Other architectures differ in attention or layout."
        )
    if config.num_attention_heads % config.num_key_value_heads != 0:
        raise UpcycleError("the source's num_attention_heads is not a multiple of num_key_value_heads.")
    layer_types = getattr(config, "layer_types", None) or []
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False) and "sliding_attention" in layer_types:
        if "full_attention" in layer_types:
            raise UpcycleError(
                "the source mixes sliding-window and full-attention layers (Qwen2 use_sliding_window with "
                "max_window_layers), which GQE cannot carry: it has one attention type for all layers."
            )
    if getattr(config, "mlp_bias", False) and model_type != "llama":
        raise UpcycleError("mlp_bias is only carried for llama sources.")


def source_sliding_window(config) -> int | None:
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return config.sliding_window
    return None


def gqe_config_from_source(source_config, **gqe_fields) -> GQEConfig:
    head_dim = getattr(source_config, "head_dim", None) or source_config.hidden_size // source_config.num_attention_heads
    return GQEConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_key_value_heads=source_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        rms_norm_eps=source_config.rms_norm_eps,
        rope_parameters=dict(source_config.rope_parameters),
        tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama has them when attention_bias is set.
        attention_bias=source_config.model_type == "qwen2" or bool(getattr(source_config, "attention_bias", False)),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        sliding_window=source_sliding_window(source_config),
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        pad_token_id=source_config.pad_token_id,
        **gqe_fields,
    )


# ---------------------------------------------------------------------------------------------- weight copies


def copy_shared_weights(source, target) -> None:
    """Everything but the attention's query side and output projection is copied unchanged."""
    target_state = target.state_dict()
    with torch.no_grad():
        for name, tensor in source.state_dict().items():
            if ".self_attn.q_proj." in name or ".self_attn.o_proj." in name:
                continue
            if name not in target_state:
                raise UpcycleError(f"source weight {name} has no place in the GQE model")
            target_state[name].copy_(tensor)


def source_attention_weights(layer, num_heads: int, head_dim: int):
    """q weight [H, d, D], q bias [H, d] or None, o weight [D, H, d], o bias [D] or None."""
    attn = layer.self_attn
    q_weight = attn.q_proj.weight.view(num_heads, head_dim, -1)
    q_bias = attn.q_proj.bias.view(num_heads, head_dim) if attn.q_proj.bias is not None else None
    o_weight = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], num_heads, head_dim)
    return q_weight, q_bias, o_weight, attn.o_proj.bias


def init_shared_head(attn, q_weight, q_bias) -> None:
    """The shared head starts as the average source query: it attends to the average key, so the two match."""
    attn.q_shared.weight.copy_(q_weight.mean(0))
    if attn.q_shared.bias is not None:
        attn.q_shared.bias.copy_(q_bias.mean(0) if q_bias is not None else torch.zeros_like(attn.q_shared.bias))


def build_exact(source, copies: int, noise: float, seed: int) -> GQEForCausalLM:
    if copies < 1:
        raise UpcycleError(f"--copies must be >= 1, got {copies}.")
    if noise < 0:
        raise UpcycleError(f"--noise must be >= 0, got {noise}.")
    src = source.config
    H, G = src.num_attention_heads, src.num_key_value_heads
    r = H // G
    config = gqe_config_from_source(
        src, num_attention_heads=H * copies, num_experts_per_tok=r, expert_routing="partitioned", gqe_variant="gqe"
    )
    model = GQEForCausalLM(config).eval()
    copy_shared_weights(source, model)
    d, M = config.head_dim, config.num_experts_per_group
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for source_layer, layer in tqdm(
            list(zip(source.model.layers, model.model.layers)), desc="converting layers (exact)", unit="layer"
        ):
            q_weight, q_bias, o_weight, o_bias = source_attention_weights(source_layer, H, d)
            attn = layer.self_attn
            # Expert e = g*M + m; block j (m // copies) of group g holds copies of source head g*r + j.
            source_head = torch.arange(G * M) // M * r + (torch.arange(G * M) % M) // copies
            expert_q = q_weight[source_head].clone()  # [G*M, d, D]
            if noise > 0:
                scale = expert_q.std() * noise
                expert_q += torch.randn(expert_q.shape, generator=generator) * scale
            attn.q_proj.weight.copy_(expert_q.reshape(-1, config.hidden_size))
            if attn.q_proj.bias is not None:
                bias = q_bias[source_head] if q_bias is not None else torch.zeros(G * M, d)
                attn.q_proj.bias.copy_(bias.reshape(-1))
            # Hard slot (g, j) is source head g*r + j: its o_proj columns are the source's, in the same order.
            o_proj = torch.zeros_like(attn.o_proj.weight)
            o_proj[:, : H * d] = o_weight.reshape(o_weight.shape[0], H * d)
            attn.o_proj.weight.copy_(o_proj)  # weighted and shared slots: zero, so no effect at conversion
            if attn.o_proj.bias is not None:
                attn.o_proj.bias.copy_(o_bias if o_bias is not None else torch.zeros_like(attn.o_proj.bias))
            attn.router.weight.zero_()
            init_shared_head(attn, q_weight, q_bias)
    return model


def build_sparse_initial(source, top_k: int) -> GQEForCausalLM:
    """Sparse GQE: K slots per group over partitioned blocks of the source heads (see `calibrate.py`).
    Blocks start in head order; calibration re-chooses them by importance and fits routers and o_proj."""
    from .calibrate import set_sparse_experts, sparse_blocks

    src = source.config
    H, G = src.num_attention_heads, src.num_key_value_heads
    r = H // G
    if not 1 <= top_k < r:
        raise UpcycleError(
            f"--top-k {top_k} is outside the source's heads: each KV group has r = {r} query heads, and sparse "
            f"mode keeps K in [1, {r - 1}] of them per token (K = {r} keeps all: use --mode exact)."
        )
    width = -(-r // top_k)
    config = gqe_config_from_source(
        src, num_attention_heads=G * top_k * width, num_experts_per_tok=top_k, expert_routing="partitioned",
        gqe_variant="gqe",
    )
    model = GQEForCausalLM(config).eval()
    copy_shared_weights(source, model)
    blocks = [sparse_blocks(list(range(r)), top_k) for _ in range(G)]
    with torch.no_grad():
        for source_layer, layer in zip(source.model.layers, model.model.layers):
            set_sparse_experts(layer.self_attn, source_layer.self_attn, blocks)
            q_weight, q_bias, _, _ = source_attention_weights(source_layer, H, config.head_dim)
            init_shared_head(layer.self_attn, q_weight, q_bias)
    return model


# ------------------------------------------------------------------------------------------------ writing out


def model_card(src: str, options: UpcycleOptions, config: GQEConfig, report: dict) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [gqe, grouped-query-experts, upcycled]",
        "---",
        f"# GQE upcycled from `{src}`",
        "",
        "Grouped Query Experts (arXiv 2606.20945) converted with `gqe-upcycle`.",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{src}`{' (GGUF ' + options.gguf_file + ')' if options.gguf_file else ''} |",
        f"| mode | {options.mode} |",
        f"| query-head experts | {config.num_attention_heads} ({config.num_key_value_heads} KV groups x {config.num_experts_per_group}) |",
        f"| selected per group | {config.num_experts_per_tok} ({config.expert_routing} routing) |",
        f"| active query heads per token | {config.active_query_heads} ({config.num_key_value_heads * config.num_experts_per_tok} routed + "
        f"{config.active_query_heads - config.num_key_value_heads * config.num_experts_per_tok} shared) |",
    ]
    for key, value in report.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


def prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UpcycleError(f"{out} already exists: choose another OUT or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"{out} exists and is not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)


def move_into_place(staging: Path, out: Path) -> None:
    """Replace OUT by the complete staging folder; the old OUT (with --force) is removed only afterwards."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
    staging.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def check_sequences(tokenizer, text: str | None, vocab_size: int, count: int, length: int = 64, seed: int = 0):
    if tokenizer is not None and text:
        ids = tokenizer(text[: 200 * length * count], return_tensors="pt").input_ids[0]
        if ids.numel() >= count * length:
            return ids[: count * length].view(count, length)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator)


@torch.no_grad()
def max_logit_difference(source, converted, input_ids) -> float:
    worst = 0.0
    for row in input_ids:
        expected = source(row[None]).logits
        actual = converted(row[None]).logits
        worst = max(worst, (expected - actual).abs().max().item())
    return worst


def check_exact(source, folder: Path, tokenizer, text: str | None, count: int, tolerance: float = 1e-4) -> dict:
    """Reload the written folder and compare its logits with the source's on a few sequences.

    The pass/fail figure is computed in float64, where only the conversion itself could make a difference.
    The float32 figure is printed too: it is reassociation noise of the same size as switching the source's
    own attention backend (o_proj has two more, zero, slots, so its matmul sums in another order)."""
    ids = check_sequences(tokenizer, text, source.config.vocab_size, count)
    reloaded = GQEForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fp32 = max_logit_difference(source, reloaded, ids)
    # A float64 copy through nn.Module: GGUF sources are flagged as quantized and refuse in-place dtype changes.
    fp64 = max_logit_difference(torch.nn.Module.double(copy.deepcopy(source)), reloaded.double(), ids)
    print(f"exact check on {ids.shape[0]} sequences of {ids.shape[1]} tokens: max abs logit difference "
          f"{fp64:.2e} in float64, {fp32:.2e} in float32")
    if fp64 > tolerance:
        raise UpcycleError(f"exact conversion differs from the source by {fp64:.2e} > {tolerance} (float64)")
    return {"max abs logit difference to source (float64)": fp64,
            "max abs logit difference to source (float32)": fp32}


def upcycle(src: str, out: str | os.PathLike, options: UpcycleOptions | None = None, **overrides) -> dict:
    """Convert SRC into a GQE checkpoint folder OUT. Returns a report (also written into the model card)."""
    options = options or UpcycleOptions()
    for key, value in overrides.items():
        setattr(options, key, value)
    if options.mode not in ("exact", "sparse"):
        raise UpcycleError(f"--mode must be 'exact' or 'sparse', got {options.mode!r}.")
    if options.dtype not in DTYPES:
        raise UpcycleError(f"--dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}.")
    if options.mode == "sparse" and options.top_k is None:
        raise UpcycleError("--mode sparse needs --top-k K, the query heads kept per KV group.")
    if options.calibration_file and not Path(options.calibration_file).is_file():
        raise UpcycleError(f"--calibration-file {options.calibration_file} does not exist.")
    out = Path(out)
    prepare_output(out, options.force)

    source, tokenizer = load_source(src, options.gguf_file)
    text = Path(options.calibration_file).read_text(encoding="utf-8") if options.calibration_file else None
    report: dict = {}
    if options.mode == "exact":
        model = build_exact(source, options.copies, options.noise, options.seed)
    else:
        from .calibrate import calibrate_sparse, held_out_perplexity, split_calibration_text

        model = build_sparse_initial(source, options.top_k)
        if text is None:
            raise UpcycleError("--mode sparse needs --calibration-file TXT: plain text the fit runs on.")
        if tokenizer is None:
            raise UpcycleError(f"{src} has no tokenizer, which sparse calibration needs to read the text.")
        fit_ids, held_out_ids = split_calibration_text(
            tokenizer, text, options.calibration_tokens, held_out_tokens=options.held_out_tokens
        )
        calibrate_sparse(source, model, fit_ids, seed=options.seed)
        ppl_source = held_out_perplexity(source, held_out_ids)
        ppl_converted = held_out_perplexity(model, held_out_ids)
        report["held-out perplexity (source)"] = ppl_source
        report["held-out perplexity (converted)"] = ppl_converted
        report["perplexity ratio"] = ppl_converted / ppl_source
        print(f"held-out perplexity: source {ppl_source:.2f}, converted {ppl_converted:.2f} "
              f"({ppl_converted / ppl_source:.3f}x)")

    model.generation_config = source.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with tqdm(total=3, desc="saving", unit="step") as progress:
            model.to(DTYPES[options.dtype]).save_pretrained(staging)
            progress.update()
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            progress.update()
            if options.mode == "exact" and options.noise == 0:
                report.update(check_exact(source, staging, tokenizer, text, options.check_sequences))
            progress.update()
        config = model.config
        (staging / "README.md").write_text(model_card(src, options, config, report))
        (staging / "upcycle.json").write_text(json.dumps({"source": src, **vars(options), **report}, indent=2))
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {out}: {config.num_attention_heads} query-head experts, "
          f"{config.active_query_heads} active query heads per token")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="gqe-upcycle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="Transformers folder, hub id, or folder holding the GGUF file of --gguf-file")
    parser.add_argument("out", help="output folder (must not exist unless --force)")
    parser.add_argument("--gguf-file", help="GGUF file name inside SRC, read through transformers' GGUF loader")
    parser.add_argument("--mode", choices=["exact", "sparse"], required=True)
    parser.add_argument("--copies", type=int, default=2, help="exact: experts per source head (default 2)")
    parser.add_argument("--noise", type=float, default=0.0, help="exact: relative std of noise on copies")
    parser.add_argument("--top-k", type=int, help="sparse: query heads kept per KV group and token")
    parser.add_argument("--calibration-file", help="text file for the sparse fit (its tail is held out)")
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="tokens used for the fit")
    parser.add_argument("--held-out-tokens", type=int, default=8192,
                        help="sparse: tokens of the text's last 10%% on which perplexity is reported")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        upcycle(
            args.src, args.out,
            UpcycleOptions(
                mode=args.mode, copies=args.copies, noise=args.noise, top_k=args.top_k,
                calibration_file=args.calibration_file, calibration_tokens=args.calibration_tokens,
                held_out_tokens=args.held_out_tokens, gguf_file=args.gguf_file, dtype=args.dtype, force=args.force,
            ),
        )
    except UpcycleError as error:
        print(f"gqe-upcycle: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
