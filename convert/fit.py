"""Sparse conversion: fewer active query heads, repaired by a layer-wise fit on calibration text.

A sparse conversion keeps K of the r query heads of each KV group per token (plus the shared head). Two things
are lost: the dropped heads' contributions, and each head's own output projection (a GQE hard slot has one
projection, whichever expert fills it). The layout limits the second loss and the fit repairs the rest:

Layout (partitioned routing). The group's r heads are split into K blocks, the most important heads in the
smallest blocks; slot j holds the top-1 of block j. With r = 3, K = 2 the most important head has a slot of its
own (its block is padded with a copy of it, so it keeps its exact projection) and the two others share one.
Blocks are chosen per layer from the heads' average contribution on the calibration text, or (block_layout
"fit-error") by trying each group's splits in turn and keeping the one whose fit (steps 1-2) leaves the least
error.

Fit, layer by layer, on the converted model's own activations:
1. Router: per token, how much each head contributes (the norm of its projected output) is what an oracle
   would route on. The router is a ridge regression from the layer's normalised input onto the log of those
   norms, centred within each block, so it learns to pick the head that matters most for this token.
2. Output projection: with the router set, the GQE layer's slot features (G*K hard slots, the weighted slot,
   the shared head) are a fixed function of the input, and the source attention's output is the target.
   `o_proj` is their ridge-regression fit: the best linear read-out of the kept heads, which also lets the
   shared head and the weighted slot stand in for the dropped heads' average contribution.
   The first position of each sequence is weighted heavily (`first_token_weight`): there every head sees
   only itself, the read-out can be exact, and models with attention sinks depend on it.
3. Optionally (`refine_epochs`), a few epochs of Adam on all of the layer's attention weights together, on the
   same error: the closed forms cannot reach the query experts, the shared query or K/V (bench/RESULTS.md).
4. The converted layer (with its new weights) produces the next layer's input, so later layers are fitted on
   what they will actually see. Optionally (`drift_correction`), each layer's target also takes back part of the
   drift of that input from the source's: the errors of the layers before it compound otherwise.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .layout import (
    MAX_PARTITIONS,
    SourceAttention,
    group_layouts,
    least_dropped_blocks,
    set_sparse_experts,
    sparse_blocks,
)
from .sources import llama_named_state_dict


LAYOUT_SEARCH_TOKENS = 16384  # "fit-error" layouts: calibration tokens each candidate is fitted on (the best: all)


@dataclass
class FitData:
    """A layer's calibration batches: inputs, targets and the source heads' log contributions, with the inputs
    flattened to rows and their Gram matrix (for the router's regression)."""

    normed: list[torch.Tensor]  # the layer's normalised inputs, [b, T, D] per batch
    targets: list[torch.Tensor]  # the source attention's outputs on them, [b, T, D]
    log_norm: torch.Tensor  # [tokens, H], each source head's log contribution
    flat_inputs: torch.Tensor  # [tokens, D], float64
    flat_gram: torch.Tensor  # [D, D]

    @classmethod
    def of(cls, normed, targets, log_norms, batches=None):
        """From per-batch lists, keeping the batches at the indices `batches` (default: all)."""
        if batches is not None:
            normed, targets, log_norms = ([part[i] for i in batches] for part in (normed, targets, log_norms))
        flat_inputs = torch.cat([h.reshape(-1, h.shape[-1]) for h in normed]).double()
        return cls(normed, targets, torch.cat(log_norms), flat_inputs, flat_inputs.T @ flat_inputs)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, relative_ridge: float) -> torch.Tensor:
    """argmin_W ||X W - Y||^2 + lambda ||W||^2 from X^T X and X^T Y, lambda relative to the mean diagonal."""
    ridge = relative_ridge * gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, cross)


def head_contributions(head_outputs: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """Norm of each head's output after o_proj: [b, T, H, d] outputs, [D, H, d] o_proj -> [b, T, H]."""
    return torch.einsum("bthd,ohd->btho", head_outputs, o_weight).norm(dim=-1)


def capture_input(module):
    """Record the input of `module` (e.g. an o_proj) on each forward. Returns (store, hook handle)."""
    store = {}

    def hook(_, args):
        store["input"] = args[0].detach()

    return store, module.register_forward_pre_hook(hook)


def fit_router(attn, x: torch.Tensor, x_gram: torch.Tensor, log_norm: torch.Tensor, relative_ridge: float) -> None:
    """Set `attn.router` to the ridge regression from the layer's normalised input x [tokens, D] (float64, with
    its Gram matrix x^T x) onto each expert's log contribution [tokens, G*M], centred within each block: per block,
    the router learns which expert matters most for the token."""
    G, M, k = attn.num_groups, attn.experts_per_group, attn.top_k
    target = log_norm.view(-1, G, k, M // k)
    target = (target - target.mean(dim=-1, keepdim=True)).view(-1, G * M).double()
    router = ridge_solve(x_gram, x.T @ target, relative_ridge)
    attn.router.weight.copy_(router.T.to(attn.router.weight.dtype))


def fit_output_projection(attn, normed: list[torch.Tensor], targets: list[torch.Tensor], position_embeddings,
                          first_token_weight: float, relative_ridge: float) -> float:
    """Set `attn.o_proj` to the ridge regression of the source attention's outputs (`targets`) on the GQE layer's
    slot features for the inputs `normed`, with its router as set, each sequence's first position weighted by
    `first_token_weight`. Returns the fit's squared error on the other positions, relative to the targets' squared
    norm there: what the layer misses where attention reads more than one position. (The first position is left
    out because its weight could let it dominate the figure; on SmolLM2 its error is near zero whatever the layout,
    since every head of a group reads the same single value there, and the weighted error chose the same layouts.)"""
    bias = attn.o_proj.bias
    row_weight = torch.ones(normed[0].shape[1], dtype=torch.float64)
    row_weight[0] = first_token_weight
    gram, cross, target_norm = 0.0, 0.0, 0.0  # weighted sums over every position
    first_gram, first_cross, first_norm = 0.0, 0.0, 0.0  # unweighted sums over the first positions
    store, handle = capture_input(attn.o_proj)
    for h, wanted in zip(normed, targets):
        attn(h, position_embeddings=position_embeddings, attention_mask=None)
        features = store["input"].double()
        y = wanted.double()
        if bias is not None:
            y = y - bias.double()
        first_gram = first_gram + features[:, 0].T @ features[:, 0]
        first_cross = first_cross + features[:, 0].T @ y[:, 0]
        first_norm = first_norm + y[:, 0].pow(2).sum()
        # Weighted least squares: scale rows by sqrt(weight).
        features = (features * row_weight.sqrt()[:, None]).reshape(-1, features.shape[-1])
        y = (y * row_weight.sqrt()[:, None]).reshape(-1, y.shape[-1])
        gram = gram + features.T @ features
        cross = cross + features.T @ y
        target_norm = target_norm + y.pow(2).sum()
    handle.remove()
    weight = ridge_solve(gram, cross, relative_ridge)  # [slots*d, D]
    attn.o_proj.weight.copy_(weight.T.to(attn.o_proj.weight.dtype))
    # Sums over the other positions (weight 1), then ||F W - Y||^2 = ||Y||^2 - 2 <W, F^T Y> + <W, F^T F W>.
    gram, cross = gram - first_token_weight * first_gram, cross - first_token_weight * first_cross
    target_norm = target_norm - first_token_weight * first_norm
    error = target_norm - 2 * (weight * cross).sum() + (weight * (gram @ weight)).sum()
    return (error / target_norm.clamp(min=1e-30)).item()


def search_layout(fit_error, blocks: list, candidates: list, max_sweeps: int = 2) -> list:
    """Coordinate descent over the groups' block layouts, by the fit's own error: for each group in turn, every
    candidate layout of its heads (`candidates[g]`, from `layout.group_layouts`) is fitted with the other groups'
    kept, and the one whose fit leaves the least error is kept. Sweeps over the groups until one changes nothing
    (at most `max_sweeps`). `fit_error(blocks)` lays the heads out, fits the layer and returns the error; `blocks`
    is the starting layout. Returns the best layout found."""
    error = fit_error(blocks)
    for _ in range(max_sweeps):
        changed = False
        for g, layouts in enumerate(candidates):
            for layout in layouts:
                if layout == blocks[g]:
                    continue
                trial = [*blocks[:g], layout, *blocks[g + 1 :]]
                trial_error = fit_error(trial)
                if trial_error < error:
                    blocks, error, changed = trial, trial_error, True
        if not changed:
            break
    return blocks


def refine_attention(attn, inputs: list[torch.Tensor], targets: list[torch.Tensor], position_embeddings,
                     row_weight: torch.Tensor, epochs: int, learning_rate: float) -> tuple[float, float]:
    """Adam on every weight of one converted attention layer, minimising the o_proj fit's weighted squared error to
    the source attention's output on the same inputs (relative to the targets' mean squared norm, so the rate does
    not depend on the layer's scale). Returns that error before and after; if Adam's steps made it worse (they can,
    where the closed form was already near the optimum), the layer's weights are put back as they were.

    The closed-form fits reach the router and o_proj one at a time, each with the rest frozen; this step moves them
    together with what they cannot reach: the query experts (a shared slot's projection serves two heads, so their
    queries can be re-aimed), the shared head's query and the K/V projections."""
    row_weight = row_weight.to(targets[0].dtype)
    scale = torch.stack([y.pow(2).sum(-1).mean() for y in targets]).mean()

    def error(h, wanted):
        output = attn(h, position_embeddings=position_embeddings, attention_mask=None)[0]
        return ((output - wanted).pow(2).sum(-1) * row_weight).mean() / scale

    def mean_error():
        return sum(error(h, wanted).item() for h, wanted in zip(inputs, targets)) / len(inputs)

    before, weights = mean_error(), {name: value.clone() for name, value in attn.state_dict().items()}
    optimizer = torch.optim.Adam(attn.parameters(), lr=learning_rate)
    with torch.enable_grad():
        for _ in range(epochs):
            for h, wanted in zip(inputs, targets):
                loss = error(h, wanted)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    after = mean_error()
    if after > before:
        attn.load_state_dict(weights)
    return before, min(before, after)


@torch.no_grad()
def calibrate_sparse(source, model, fit_ids: torch.Tensor, batch_size: int = 8, seed: int = 0,
                     router_ridge: float = 1e-3, output_ridge: float = 3e-4,
                     first_token_weight: float = 2048.0, block_layout: str = "importance",
                     refine_epochs: int = 0, refine_learning_rate: float = 1e-4,
                     refine_batch_size: int | None = None, drift_correction: float = 0.0) -> torch.Tensor:
    """Fit routers and o_proj of `model` (sparse GQE built from `source`) on `fit_ids` [n, T], in place.
    Returns the source head each expert copies, per converted layer: [converted layers, G*M] (experts are laid out
    per layer; the model's `dense_attention_layers` keep the source's attention, are not fitted and have no row).

    Each converted attention layer is fitted to the source attention's output on the same (converted) input, plus
    `drift_correction` times the drift of the converted residual stream from the source's (run alongside): the
    target that would put the stream back where the source's is after this attention. 0 keeps the fit layer-local;
    1 corrects the whole drift (an early version of the fit was 6x worse for it on SmolLM2). Half helps the text of
    the calibrated domains (K = 2 SmolLM2, three domains: perplexity 38.02 / 37.37 / 21.16 at 0, 37.64 / 35.47 /
    20.04 at 0.5, 37.85 / 36.28 / 20.39 at 1) but not a domain left out of the calibration, nor zero-shot scores
    (bench/RESULTS.md, "Taking back the residual stream's drift").
    first_token_weight: weight of each sequence's first position in the o_proj fit. Models like SmolLM2 build
    a massive "attention sink" activation on the first token in their early layers; an unweighted fit,
    where that row is 1 of seq_len, misses it for some first tokens and perplexity explodes on those
    sequences (SmolLM2, K = 2, 8k held-out tokens: 77.9 unweighted, 58.0 at 256, 49.1 at 2048).
    block_layout: how a group's heads are split into blocks. "importance" (above: the most important heads in
    the smallest blocks); "least-dropped": the split that loses the least contribution per token when each
    block keeps its largest head (`layout.least_dropped_blocks`); "fit-error": starting from "importance", each
    group's split re-chosen among all of them by the error the layer's fit leaves (`search_layout`: a fit per
    candidate, on LAYOUT_SEARCH_TOKENS of the calibration tokens; for r = 3, K = 2, 7 to 13 of them per layer; a
    group with more than layout.MAX_PARTITIONS splits keeps its "importance" one).
    refine_epochs, refine_learning_rate: passes of `refine_attention` over the calibration text after each layer's
    closed-form fit, and Adam's rate (0: off, the closed forms alone).
    refine_batch_size: sequences per Adam step (default: batch_size). The closed forms do not depend on batching;
    the refinement takes more, smaller steps in smaller batches.
    """
    torch.manual_seed(seed)
    for network in (source, model):
        network.eval()
        network.set_attn_implementation("sdpa")  # mask-free causal attention below relies on sdpa's is_causal
    config = model.config
    G, M = config.num_key_value_heads, config.num_experts_per_group
    H = source.config.num_attention_heads
    r = H // G
    d = config.head_dim
    seq_len = fit_ids.shape[1]
    position_ids = torch.arange(seq_len)[None]

    batches = list(fit_ids.split(batch_size))
    hidden = [model.model.embed_tokens(batch) for batch in batches]  # converted residual stream, per batch
    source_hidden = [x.clone() for x in hidden] if drift_correction else None  # the source's own residual stream
    position_embeddings = model.model.rotary_emb(hidden[0], position_ids)
    weights = llama_named_state_dict(source)
    refined = []  # (error before, after) of each layer's refinement
    row_weight = torch.ones(seq_len, dtype=torch.float64)  # of each position in the refinement's error
    row_weight[0] = first_token_weight
    layer_expert_heads = []
    # "fit-error" searches on these batches, spread evenly over the calibration text: a mix of sources comes in
    # source order, and its first batches would hold one source alone.
    search_count = min(len(batches), -(-LAYOUT_SEARCH_TOKENS // (batch_size * seq_len)))
    search_batches = sorted(set(torch.linspace(0, len(batches) - 1, search_count).round().long().tolist()))

    for index, (source_layer, layer) in enumerate(
        tqdm(list(zip(source.model.layers, model.model.layers)), desc="calibrating layers", unit="layer")
    ):
        if config.is_dense_attention_layer(index):  # the source's attention, nothing to fit: step 4 only
            hidden = [layer(x, position_embeddings=position_embeddings, position_ids=position_ids,
                            attention_mask=None) for x in hidden]
            if drift_correction:
                source_hidden = [source_layer(x, position_embeddings=position_embeddings, position_ids=position_ids,
                                              attention_mask=None) for x in source_hidden]
            continue
        source_attn, attn = source_layer.self_attn, layer.self_attn
        k = attn.top_k  # this layer's (`layer_num_experts_per_tok`): its blocks are M / k experts wide
        source_heads = SourceAttention.of_layer(weights, index, H, d)
        o_weight = source_heads.o_weight  # [D, H, d]
        normed = [layer.input_layernorm(x) for x in hidden]

        # 1. Per-head contributions of the source attention on this input; they choose the blocks and are the
        #    router's regression target (log norm, centred within each block).
        targets, log_norms = [], []
        store, handle = capture_input(source_attn.o_proj)
        for h in normed:
            targets.append(source_attn(h, position_embeddings=position_embeddings, attention_mask=None)[0])
            head_outputs = store["input"].view(*h.shape[:2], H, d)  # [b, T, H, d]
            contribution = head_contributions(head_outputs, o_weight)  # [b, T, H]
            log_norms.append(contribution.clamp(min=1e-6).log().reshape(-1, H))
        handle.remove()
        if drift_correction:
            # Part of the way from the layer-local target to the one that puts the converted residual stream where
            # the source's is after this attention: the earlier layers' drift, as far as this layer can undo it.
            for i, (source_x, x) in enumerate(zip(source_hidden, hidden)):
                source_after = source_x + source_attn(source_layer.input_layernorm(source_x),
                                                      position_embeddings=position_embeddings, attention_mask=None)[0]
                drift = source_after - (x + targets[i])  # [b, T, D]
                targets[i] = targets[i] + drift_correction * drift
        everything = FitData.of(normed, targets, log_norms)
        contribution = everything.log_norm.exp().view(-1, G, r)
        importance = contribution.mean(0)  # [G, r]

        def fit_layout(blocks, data):
            """Lay the heads out in `blocks`, fit the router (step 1) and o_proj (step 2) on `data`; the fit's
            error."""
            expert_heads = set_sparse_experts(attn, source_heads, blocks)  # [G*M]
            fit_router(attn, data.flat_inputs, data.flat_gram, data.log_norm[:, expert_heads], router_ridge)
            return expert_heads, fit_output_projection(attn, data.normed, data.targets, position_embeddings,
                                                       first_token_weight, output_ridge)

        # 2. The layout, then the router and o_proj fitted for it.
        if block_layout == "least-dropped":
            blocks = [least_dropped_blocks(contribution[:, g], k, M // k) for g in range(G)]
        else:
            blocks = [sparse_blocks(importance[g].argsort(descending=True).tolist(), k, M // k) for g in range(G)]
        if block_layout == "fit-error":  # each candidate fitted on some of the batches, the one kept on all
            searched = FitData.of(normed, targets, log_norms, search_batches)
            candidates = [group_layouts(importance[g], k, M // k) for g in range(G)]
            candidates = [layouts if len(layouts) <= MAX_PARTITIONS else [] for layouts in candidates]  # too many
            blocks = search_layout(lambda trial: fit_layout(trial, searched)[1], blocks, candidates)
        expert_heads, _ = fit_layout(blocks, everything)
        layer_expert_heads.append(expert_heads)

        # 3. Optionally, all of the layer's weights together by gradient descent on the same error.
        if refine_epochs:
            step_size = refine_batch_size or batch_size
            step_inputs = [part for h in normed for part in h.split(step_size)]
            step_targets = [part for wanted in targets for part in wanted.split(step_size)]
            refined.append(refine_attention(attn, step_inputs, step_targets, position_embeddings, row_weight,
                                            refine_epochs, refine_learning_rate))

        # 4. Next layer's input, through the converted layer as it now is.
        hidden = [
            layer(x, position_embeddings=position_embeddings, position_ids=position_ids, attention_mask=None)
            for x in hidden
        ]
        if drift_correction:
            source_hidden = [
                source_layer(x, position_embeddings=position_embeddings, position_ids=position_ids,
                             attention_mask=None)
                for x in source_hidden
            ]
    if refined:
        before, after = (sum(errors) / len(refined) for errors in zip(*refined))
        kept = sum(new < old for old, new in refined)
        print(f"refinement: mean relative attention error {before:.4f} -> {after:.4f} over {len(refined)} layers "
              f"(improved and kept in {kept})")
    return torch.stack(layer_expert_heads)
