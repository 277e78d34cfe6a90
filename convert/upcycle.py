"""Upcycle a GQA checkpoint (Llama, Mistral, Qwen2, Phi-3, SmolLM) into Grouped Query Experts.

    gqe-upcycle SRC OUT --mode exact  [--copies C] [--noise S]
    gqe-upcycle SRC OUT --mode sparse --top-k K --calibration-file TXT
    gqe-upcycle SRC OUT --mode sparse --top-k K --calibration-data wiki.parquet,weight=2 notes.jsonl,column=body

Source heads: H query heads in G KV groups, r = H / G per group, head size d.

exact   Every source query head becomes one slot whose experts are C copies of it (partitioned routing, k = r,
        M = C * r). Routers start at zero, the weighted and shared slots start with a zero output projection,
        so the converted model computes exactly the source's function (checked after writing). `--noise S`
        perturbs the copies (relative std S) to break their symmetry before training.
sparse  Each source head is an expert and the router picks K < r of them per group, plus the shared head:
        G*K + 1 query-attention computations instead of H. Slot output projections, the shared head and the
        routers are fitted on calibration text, layer by layer, so that each converted attention layer
        reproduces the source layer's output as closely as a linear fit allows (convert/fit.py). Calibration
        text comes from files or saved datasets, mixed by weight (convert/data.py). `--dense-layers 10-19` keeps
        those layers' attention as the source's (all H heads, no router: `dense_attention_layers`);
        `--layer-top-k 1:3-4,7` gives layers 3, 4 and 7 a k of their own (`layer_num_experts_per_tok`).

Every input is checked before the weights are loaded; OUT is written into a hidden sibling folder and renamed
into place only when complete.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from modeling_gqe import GQEForCausalLM

from .cli import option, run_command, with_overrides
from .data import blocks_of, load_token_blocks
from .errors import UpcycleError
from .evaluate import perplexity
from .layout import (
    BLOCK_LAYOUTS,
    build_exact,
    build_sparse_initial,
    check_sparse_top_k,
    parse_dense_layers,
    parse_layer_top_k,
)
from .sources import read_source_config, read_source_tokenizer, read_source_weights
from .staging import model_card, staged_output


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class UpcycleOptions:
    mode: Literal["exact", "sparse"] = option("exact", "exact: copies of every head, same function; sparse: K of "
                                              "each group's heads per token, fitted on calibration text", required=True)
    copies: int = option(2, "exact: experts per source head")
    noise: float = option(0.0, "exact: relative std of noise on the copies, to break their symmetry")
    top_k: int | None = option(None, "sparse: query heads kept per KV group and token")
    dense_layers: str = option("", "sparse: layers that keep the source's dense attention unchanged (all heads, no "
                               "router), as indices and ranges, e.g. 10-19 or 0,5-7 (default: none)")
    layer_top_k: list[str] = option([], "sparse: K:LAYERS, a k of their own for some layers, e.g. 1:3-4,7 (k = 1 in "
                                    "layers 3, 4 and 7: one head per group where that costs least, to pay for "
                                    "--dense-layers); the other routed layers keep --top-k", nargs="*")
    calibration_file: str | None = option(None, "sparse: a plain-text file to fit on (its last 10%% is held out)")
    calibration_data: list[str] = option([], "sparse: data sources PATH[,weight=W][,column=NAME][,split=NAME] "
                                         "(text, JSONL, Parquet, CSV files or save_to_disk folders), mixed by weight")
    text_column: str = option("text", "default text column of tabular data sources")
    streaming: bool = option(False, "stream the data sources (for files too large to read; held out = first blocks)")
    calibration_tokens: int = option(16384, "sparse: tokens the fit runs on")
    held_out_tokens: int = option(8192, "sparse: held-out tokens on which perplexity is reported")
    seq_len: int = option(256, "sparse: length of the calibration sequences")
    router_ridge: float = option(1e-3, "sparse: ridge of the router fit, relative to the mean Gram diagonal")
    output_ridge: float = option(3e-4, "sparse: ridge of the o_proj fit, relative to the mean Gram "
                                       "diagonal (1e-5 is better with 64k+ calibration tokens, worse with 16k)")
    first_token_weight: float = option(2048.0, "sparse: weight of each sequence's first position in the o_proj fit")
    block_layout: Literal["importance", "least-dropped", "fit-error"] = option(
        "importance", "sparse: how each group's heads are split into the K routed slots: importance (the most "
        "important heads get slots of their own), least-dropped (the split losing the least per-token contribution) "
        "or fit-error (each group's split searched by the error of the layer's fit; several fits per layer)")
    refine_epochs: int = option(0, "sparse: after each layer's closed-form fit, passes of Adam over the calibration "
                                "text on all of its attention weights together (0: off)")
    refine_learning_rate: float = option(1e-4, "sparse: Adam's rate for --refine-epochs")
    refine_batch_size: int = option(8, "sparse: calibration sequences per Adam step of --refine-epochs")
    drift_correction: float = option(0.0, "sparse: share (0 to 1) of the converted residual stream's drift from the "
                                     "source's that each layer's fit takes back (0: layer-local targets; 0.5 best on "
                                     "text like the calibration's, no help on other text nor after gqe-heal)")
    gguf_file: str | None = option(None, "GGUF file name inside SRC, read through transformers' GGUF loader")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the saved weights")
    force: bool = option(False, "replace OUT if it exists")
    check_sequences: int = option(4, "exact: sequences on which the written model is checked against the source")
    seed: int = option(0, "seed of the noise and the fit")

    @property
    def data_sources(self) -> list[str]:
        return ([self.calibration_file] if self.calibration_file else []) + list(self.calibration_data)


def check_options(options: UpcycleOptions) -> None:
    if options.mode not in ("exact", "sparse"):
        raise UpcycleError(f"--mode must be 'exact' or 'sparse', got {options.mode!r}.")
    if options.dtype not in DTYPES:
        raise UpcycleError(f"--dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}.")
    if options.block_layout not in BLOCK_LAYOUTS:
        raise UpcycleError(f"--block-layout must be one of {list(BLOCK_LAYOUTS)}, got {options.block_layout!r}.")
    epochs = options.refine_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UpcycleError(f"--refine-epochs must be a whole number, 0 (off) or more, got {options.refine_epochs!r}.")
    if not options.refine_learning_rate > 0:
        raise UpcycleError(f"--refine-learning-rate must be positive, got {options.refine_learning_rate!r}.")
    size = options.refine_batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UpcycleError(f"--refine-batch-size must be a whole number, 1 or more, got {options.refine_batch_size!r}.")
    if not 0.0 <= options.drift_correction <= 1.0:
        raise UpcycleError(f"--drift-correction must be between 0 (layer-local targets) and 1 (the whole drift), "
                           f"got {options.drift_correction!r}.")
    if options.mode == "sparse" and options.top_k is None:
        raise UpcycleError("--mode sparse needs --top-k K, the query heads kept per KV group.")
    if options.mode == "exact" and options.dense_layers.strip():
        raise UpcycleError("--dense-layers applies to --mode sparse: an exact conversion keeps every layer's function.")
    if options.mode == "exact" and options.layer_top_k:
        raise UpcycleError("--layer-top-k applies to --mode sparse: an exact conversion keeps every layer's function.")
    if options.mode == "sparse" and not options.data_sources:
        raise UpcycleError("--mode sparse needs calibration text: --calibration-file TXT or --calibration-data SOURCE.")


@torch.no_grad()
def max_logit_difference(source, converted, input_ids) -> float:
    worst = 0.0
    for row in input_ids:
        worst = max(worst, (source(row[None]).logits - converted(row[None]).logits).abs().max().item())
    return worst


def check_exact(source, folder, check_ids: torch.Tensor, tolerance: float = 1e-4) -> dict:
    """Reload the written folder and compare its logits with the source's on a few sequences.

    The pass/fail figure is computed in float64, where only the conversion itself could make a difference.
    The float32 figure is printed too: it is reassociation noise of the same size as switching the source's
    own attention backend (o_proj has two more, zero, slots, so its matmul sums in another order).
    The source is left in float64: the conversion is done with it, and a copy would cost a model's memory."""
    reloaded = GQEForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fp32 = max_logit_difference(source, reloaded, check_ids)
    # Through nn.Module: GGUF sources are flagged as quantized, and their own `.double()` refuses.
    fp64 = max_logit_difference(torch.nn.Module.double(source), reloaded.double(), check_ids)
    print(f"exact check on {check_ids.shape[0]} sequences of {check_ids.shape[1]} tokens: max abs logit difference "
          f"{fp64:.2e} in float64, {fp32:.2e} in float32")
    if fp64 > tolerance:
        raise UpcycleError(f"exact conversion differs from the source by {fp64:.2e} > {tolerance} (float64)")
    return {"max abs logit difference to source (float64)": fp64,
            "max abs logit difference to source (float32)": fp32}


def exact_check_ids(options: UpcycleOptions, tokenizer, vocab_size: int, length: int = 64) -> torch.Tensor:
    """The exact check's inputs: the start of the calibration text if one was given, else random tokens."""
    count = options.check_sequences
    if tokenizer is not None and options.data_sources:
        ids = load_token_blocks(options.data_sources, tokenizer, length, count * length, text_column=options.text_column,
                                streaming=options.streaming).fit
        if ids.shape[0] == count:
            return ids
    generator = torch.Generator().manual_seed(options.seed)
    return blocks_of(torch.randint(0, vocab_size, (count * length,), generator=generator), length)


def upcycle(src: str, out, options: UpcycleOptions | None = None, **overrides) -> dict:
    """Convert SRC into a GQE checkpoint folder OUT. Options as `UpcycleOptions` and/or keyword overrides
    (an unknown name raises TypeError). Returns a report (also written into the model card and upcycle.json)."""
    from .fit import calibrate_sparse

    options = with_overrides(options or UpcycleOptions(), overrides)
    check_options(options)
    with staged_output(out, options.force) as staging:  # checks OUT first; removed again if anything fails
        # Everything cheap is checked before the weights are read: config, tokenizer, data.
        source_config = read_source_config(src, options.gguf_file)
        if options.mode == "sparse":
            check_sparse_top_k(source_config, options.top_k)
            dense_layers = parse_dense_layers(options.dense_layers, source_config.num_hidden_layers)
            layer_top_k = parse_layer_top_k(options.layer_top_k, source_config, options.top_k, dense_layers)
        tokenizer = read_source_tokenizer(src, options.gguf_file)
        data = None
        if options.mode == "sparse":
            if tokenizer is None:
                raise UpcycleError(f"{src} has no tokenizer, which sparse calibration needs to read the text.")
            data = load_token_blocks(options.data_sources, tokenizer, options.seq_len, options.calibration_tokens,
                                     options.held_out_tokens, options.text_column, options.streaming)
        source = read_source_weights(src, options.gguf_file, source_config)

        report: dict = {}
        if options.mode == "exact":
            model = build_exact(source, options.copies, options.noise, options.seed)
        else:
            model = build_sparse_initial(source, options.top_k, dense_layers, layer_top_k)
            calibrate_sparse(source, model, data.fit, seed=options.seed, router_ridge=options.router_ridge,
                             output_ridge=options.output_ridge, first_token_weight=options.first_token_weight,
                             block_layout=options.block_layout, refine_epochs=options.refine_epochs,
                             refine_learning_rate=options.refine_learning_rate,
                             refine_batch_size=options.refine_batch_size,
                             drift_correction=options.drift_correction)
            if data.held_out.numel():
                ppl_source, ppl_converted = perplexity(source, data.held_out), perplexity(model, data.held_out)
                report.update({"held-out perplexity (source)": ppl_source,
                               "held-out perplexity (converted)": ppl_converted,
                               "perplexity ratio": ppl_converted / ppl_source})
                print(f"held-out perplexity: source {ppl_source:.2f}, converted {ppl_converted:.2f} "
                      f"({ppl_converted / ppl_source:.3f}x)")

        model.generation_config = source.generation_config
        with tqdm(total=3, desc="saving", unit="step") as progress:
            model.to(DTYPES[options.dtype]).save_pretrained(staging)
            progress.update()
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            progress.update()
            if options.mode == "exact" and options.noise == 0:
                check_ids = exact_check_ids(options, tokenizer, source.config.vocab_size)
                report.update(check_exact(source, staging, check_ids))
            progress.update()
        config = model.config
        routed = config.num_key_value_heads * config.num_experts_per_tok
        dense = config.dense_attention_layers
        own_k = layers_by_own_k(config)
        attended = sum(config.active_query_heads_of(index) for index in range(config.num_hidden_layers))
        table = {
            "source": f"`{src}`" + (f" (GGUF {options.gguf_file})" if options.gguf_file else ""),
            "mode": options.mode,
            "query-head experts": f"{config.num_attention_heads} ({config.num_key_value_heads} KV groups x "
                                  f"{config.num_experts_per_group})",
            "selected per group": f"{config.num_experts_per_tok} ({config.expert_routing} routing)"
                                  + "".join(f"; {k} in layers {', '.join(map(str, layers))}"
                                            for k, layers in own_k.items()),
            "active query heads per token": f"{config.active_query_heads} ({routed} routed + "
                                            f"{config.active_query_heads - routed} shared)"
                                            + (" in the routed layers at that k" if own_k else "")
                                            + (f"; {config.dense_num_attention_heads} in the "
                                               f"{len(dense)} dense layers" if dense else ""),
            "query heads attended per token, all layers": str(attended),
            **({"dense attention layers": ", ".join(map(str, dense))} if dense else {}),
            **report,
        }
        card = model_card(f"GQE upcycled from `{src}`",
                          "Grouped Query Experts (arXiv 2606.20945) converted with `gqe-upcycle`.", table,
                          tags=["gqe", "grouped-query-experts", "upcycled"],
                          # SRC was checked to be a local folder or else a hub id: only a hub id is a base model
                          base_model=None if Path(src).exists() else src)
        card.save(staging / "README.md")
        (staging / "upcycle.json").write_text(json.dumps({"source": src, **asdict(options), **report}, indent=2))
    print(f"wrote {out}: {config.num_attention_heads} query-head experts, "
          f"{config.active_query_heads} active query heads per token"
          + "".join(f" ({config.active_query_heads_of(layers[0])} in layers {', '.join(map(str, layers))})"
                    for k, layers in own_k.items())
          + (f" ({config.dense_num_attention_heads} in dense layers {', '.join(map(str, dense))})" if dense else "")
          + f", {attended} over all {config.num_hidden_layers} layers")
    return report


def layers_by_own_k(config) -> dict[int, list[int]]:
    """The routed layers whose k differs from `num_experts_per_tok`, by their k."""
    own: dict[int, list[int]] = {}
    for index in range(config.num_hidden_layers):
        k = config.num_experts_per_tok_of(index)
        if k != config.num_experts_per_tok and not config.is_dense_attention_layer(index):
            own.setdefault(k, []).append(index)
    return own


def main(argv=None) -> int:
    return run_command(
        "gqe-upcycle", __doc__, UpcycleOptions,
        [("src", "Transformers folder, hub id, or folder holding the GGUF file of --gguf-file"),
         ("out", "output folder (must not exist unless --force)")],
        lambda src, out, options: upcycle(src, out, options), argv,
    )


if __name__ == "__main__":
    sys.exit(main())
