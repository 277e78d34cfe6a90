"""How a source's query heads become GQE experts: the config of the converted model, the exact layout (copies of
every head, the source's function reproduced) and the sparse layout (K of each group's r heads per token).

Source heads: H query heads in G KV groups, r = H / G per group, head size d. Expert e = g*M + m of the GQE model
is expert m of group g. Everything here reads the source through Llama's names (`sources.llama_named_state_dict`),
so it is the same for every family in families.py.
"""

import itertools
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from modeling_gqe import GQEConfig, GQEForCausalLM

from .errors import UpcycleError
from .families import family_of, head_dim_of
from .sources import llama_named_state_dict


@dataclass
class SourceAttention:
    """One source layer's query and output projections, split per head."""

    q_weight: torch.Tensor  # [H, d, D]
    q_bias: torch.Tensor | None  # [H, d]
    o_weight: torch.Tensor  # [D, H, d]
    o_bias: torch.Tensor | None  # [D]

    @classmethod
    def of_layer(cls, weights: dict[str, torch.Tensor], layer: int, num_heads: int, head_dim: int):
        prefix = f"model.layers.{layer}.self_attn."
        q_bias, o_bias = weights.get(prefix + "q_proj.bias"), weights.get(prefix + "o_proj.bias")
        o_weight = weights[prefix + "o_proj.weight"]
        return cls(
            q_weight=weights[prefix + "q_proj.weight"].view(num_heads, head_dim, -1),
            q_bias=q_bias.view(num_heads, head_dim) if q_bias is not None else None,
            o_weight=o_weight.view(o_weight.shape[0], num_heads, head_dim),
            o_bias=o_bias,
        )


def unfilled_gqe_model(config: GQEConfig) -> GQEForCausalLM:
    """A GQE model whose weights are all about to be copied from the source or fitted, built without random
    initialisation (which would be thrown away, and for a large source costs minutes on the CPU). Its parameters are
    zeroed, so a weight the conversion did not set is a visible zero, never leftover memory."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = GQEForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model.eval()


def gqe_config_from_source(source_config, **gqe_fields) -> GQEConfig:
    family = family_of(source_config)
    return GQEConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_key_value_heads=source_config.num_key_value_heads,
        head_dim=head_dim_of(source_config),
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        rms_norm_eps=source_config.rms_norm_eps,
        rope_parameters=dict(source_config.rope_parameters),
        tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
        attention_bias=family.attention_bias(source_config),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        sliding_window=family.sliding_window(source_config),
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        pad_token_id=source_config.pad_token_id,
        **gqe_fields,
    )


@torch.no_grad()
def copy_shared_weights(weights: dict[str, torch.Tensor], target: GQEForCausalLM) -> None:
    """Everything but the attention's query side and output projection is copied unchanged."""
    target_state = target.state_dict()
    for name, tensor in weights.items():
        if ".self_attn.q_proj." in name or ".self_attn.o_proj." in name:
            continue
        if name not in target_state:
            raise UpcycleError(f"source weight {name} has no place in the GQE model")
        target_state[name].copy_(tensor)


@torch.no_grad()
def init_shared_head(attn, source: SourceAttention) -> None:
    """The shared head starts as the average source query: it attends to the average key, so the two match."""
    attn.q_shared.weight.copy_(source.q_weight.mean(0))
    if attn.q_shared.bias is not None:
        bias = source.q_bias.mean(0) if source.q_bias is not None else torch.zeros_like(attn.q_shared.bias)
        attn.q_shared.bias.copy_(bias)


# ------------------------------------------------------------------------------------------------------ exact


@torch.no_grad()
def build_exact(source, copies: int, noise: float, seed: int) -> GQEForCausalLM:
    """Every source head becomes one slot whose experts are `copies` copies of it (partitioned routing, k = r,
    M = copies * r). Zero routers and a zero output projection for the weighted and shared slots: the converted
    model computes the source's function. `noise` perturbs the copies (relative std) to break their symmetry."""
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
    model = unfilled_gqe_model(config)
    weights = llama_named_state_dict(source)
    copy_shared_weights(weights, model)
    d, M = config.head_dim, config.num_experts_per_group
    generator = torch.Generator().manual_seed(seed)
    # Expert e = g*M + m; block j (m // copies) of group g holds copies of source head g*r + j.
    source_head = torch.arange(G * M) // M * r + (torch.arange(G * M) % M) // copies
    for index, layer in enumerate(tqdm(model.model.layers, desc="converting layers (exact)", unit="layer")):
        source_attn = SourceAttention.of_layer(weights, index, H, d)
        attn = layer.self_attn
        expert_q = source_attn.q_weight[source_head].clone()  # [G*M, d, D]
        if noise > 0:
            expert_q += torch.randn(expert_q.shape, generator=generator) * expert_q.std() * noise
        attn.q_proj.weight.copy_(expert_q.reshape(-1, config.hidden_size))
        if attn.q_proj.bias is not None:
            bias = source_attn.q_bias[source_head] if source_attn.q_bias is not None else torch.zeros(G * M, d)
            attn.q_proj.bias.copy_(bias.reshape(-1))
        # Hard slot (g, j) is source head g*r + j: its o_proj columns are the source's, in the same order.
        o_proj = torch.zeros_like(attn.o_proj.weight)
        o_proj[:, : H * d] = source_attn.o_weight.reshape(-1, H * d)
        attn.o_proj.weight.copy_(o_proj)  # weighted and shared slots: zero, so no effect at conversion
        if attn.o_proj.bias is not None:
            o_bias = source_attn.o_bias if source_attn.o_bias is not None else torch.zeros_like(attn.o_proj.bias)
            attn.o_proj.bias.copy_(o_bias)
        attn.router.weight.zero_()
        init_shared_head(attn, source_attn)
    return model


# ----------------------------------------------------------------------------------------------------- sparse


def sparse_blocks(heads_by_importance: list[int], top_k: int, width: int | None = None) -> list[list[int]]:
    """Split a group's heads (most important first) into `top_k` blocks for partitioned routing, the most
    important heads in the smallest blocks; each block is padded with copies of its first head to `width` experts
    (default: the largest block's size; a layer whose k differs from the model's pads to M / k).

    >>> sparse_blocks([2, 0, 1], 2)
    [[2, 2], [0, 1]]
    >>> sparse_blocks([2, 0, 1], 1, width=4)
    [[2, 0, 1, 2]]
    """
    r = len(heads_by_importance)
    base, extra = divmod(r, top_k)
    sizes = [base] * (top_k - extra) + [base + 1] * extra
    width = width or -(-r // top_k)
    blocks, start = [], 0
    for size in sizes:
        block = heads_by_importance[start : start + size]
        blocks.append(block + [block[0]] * (width - size))
        start += size
    return blocks


BLOCK_LAYOUTS = ("importance", "least-dropped", "fit-error")
MAX_PARTITIONS = 5000  # "least-dropped" scores every partition of a group's heads up to this many, else "importance"


def block_partitions(heads: list[int], sizes: list[int]):
    """Every way to split `heads` into blocks of the given sizes (blocks of equal size unordered)."""
    if not sizes:
        yield []
        return
    size, rest = sizes[0], sizes[1:]
    for block in itertools.combinations(heads, size):
        remaining = [head for head in heads if head not in block]
        for tail in block_partitions(remaining, rest):
            if tail and len(tail[0]) == size and list(block) > tail[0]:
                continue  # the same blocks in another order
            yield [list(block), *tail]


def least_dropped_blocks(contribution: torch.Tensor, top_k: int, width: int | None = None) -> list[list[int]]:
    """Blocks for one group from its heads' per-token contributions [tokens, r] (norms of their projected
    outputs): of the partitions into `sparse_blocks`' block sizes, the one that loses the least contribution
    when each block keeps, per token, its head of largest contribution (what the router is fitted to do).
    Heads that are rarely needed on the same token share a block. Returned like `sparse_blocks`: smallest
    blocks first, heads by importance within a block, padded with copies of the first.

    >>> least_dropped_blocks(torch.tensor([[1.0, 3.0, 0.0], [1.0, 0.0, 3.0]]), 2)  # heads 1, 2 never coincide
    [[0, 0], [1, 2]]
    """
    importance = contribution.mean(0)
    layouts = group_layouts(importance, top_k, width)
    if len(layouts) > MAX_PARTITIONS:
        return sparse_blocks(importance.argsort(descending=True).tolist(), top_k, width)
    total = contribution.sum(1)

    def dropped(blocks):
        return (total - sum(contribution[:, block].max(1).values for block in blocks)).mean().item()

    return min(layouts, key=dropped)


def group_layouts(importance: torch.Tensor, top_k: int, width: int | None = None) -> list[list[list[int]]]:
    """Every split of one group's heads into `sparse_blocks`' block sizes, given their importance [r], each
    returned like `sparse_blocks`: smallest blocks first, heads by importance within a block, padded with copies of
    the first to `width`. Stops after MAX_PARTITIONS + 1 (the callers fall back to "importance" past MAX_PARTITIONS).

    >>> group_layouts(torch.tensor([1.0, 3.0, 2.0]), 2)
    [[[1, 1], [2, 0]], [[2, 2], [1, 0]], [[0, 0], [1, 2]]]
    """
    r = importance.shape[0]
    by_importance = importance.argsort(descending=True).tolist()
    sizes = sorted(len(set(block)) for block in sparse_blocks(by_importance, top_k))
    width = width or -(-r // top_k)
    layouts = []
    for partition in itertools.islice(block_partitions(by_importance, sizes), MAX_PARTITIONS + 1):
        blocks = [sorted(block, key=lambda head: -importance[head].item()) for block in partition]
        blocks.sort(key=lambda block: (len(block), -importance[block[0]].item()))
        layouts.append([block + [block[0]] * (width - len(block)) for block in blocks])
    return layouts


def check_sparse_top_k(source_config, top_k: int) -> None:
    H, G = source_config.num_attention_heads, source_config.num_key_value_heads
    r = H // G
    if r == 1:
        raise UpcycleError(
            f"sparse mode cannot apply: the source has one query head per KV head ({H} query heads, {G} KV heads), "
            "so there is no head to choose between inside a group. Use --mode exact (it duplicates every head into "
            "experts for training), or convert a GQA checkpoint."
        )
    if not 1 <= top_k < r:
        raise UpcycleError(
            f"--top-k {top_k} is outside the source's heads: each KV group has r = {r} query heads, and sparse "
            f"mode keeps K of them per token, 1 <= K <= {r - 1} (K = {r} keeps them all: use --mode exact)."
        )


@torch.no_grad()
def set_sparse_experts(attn, source: SourceAttention, blocks_per_group: list[list[list[int]]]) -> torch.Tensor:
    """Lay the source heads out as experts: expert g*M + j*width + p is head `blocks_per_group[g][j][p]` of
    group g. Copies its query weights and starts slot (g, j) with the mean output projection of its block.
    Returns the source head index of every expert, [G*M]."""
    G, d = attn.num_groups, attn.head_dim
    H = source.q_weight.shape[0]
    r = H // G
    expert_heads = torch.tensor(
        [g * r + head for g, blocks in enumerate(blocks_per_group) for block in blocks for head in block]
    )
    attn.q_proj.weight.copy_(source.q_weight[expert_heads].reshape(-1, attn.q_proj.in_features))
    if attn.q_proj.bias is not None:
        bias = source.q_bias[expert_heads] if source.q_bias is not None else torch.zeros(len(expert_heads), d)
        attn.q_proj.bias.copy_(bias.reshape(-1))
    o_weight = source.o_weight  # [D, H, d]
    o_proj = torch.zeros_like(attn.o_proj.weight).view(o_weight.shape[0], -1, d)
    for g, blocks in enumerate(blocks_per_group):
        for j, block in enumerate(blocks):
            distinct = sorted({g * r + head for head in block})
            o_proj[:, g * len(blocks) + j] = o_weight[:, distinct].mean(1)
    attn.o_proj.weight.copy_(o_proj.view(o_weight.shape[0], -1))
    if attn.o_proj.bias is not None:
        attn.o_proj.bias.copy_(source.o_bias if source.o_bias is not None else torch.zeros_like(attn.o_proj.bias))
    return expert_heads


def parse_layers(text: str, num_layers: int, label: str) -> list[int]:
    """Layer indices and FIRST-LAST ranges separated by commas ("10-19", "0,5-7", "" for none) -> the indices in
    the order given, each checked against the source's layers; `label` (the flag and its value) starts the errors."""
    layers = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        try:
            first, _, last = part.partition("-")
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise UpcycleError(f"{label}: {part!r} is not a layer or a range of layers; give indices "
                               f"and FIRST-LAST ranges separated by commas, e.g. 10-19 or 0,5-7.") from None
        if not span or span[0] < 0 or span[-1] >= num_layers:
            raise UpcycleError(f"{label}: {part!r} is not within the source's layers 0-{num_layers - 1} "
                               f"(or its first layer is after its last).")
        layers.extend(span)
    if len(set(layers)) != len(layers):
        raise UpcycleError(f"{label} lists a layer more than once.")
    return layers


def parse_dense_layers(text: str, num_layers: int) -> list[int]:
    """`--dense-layers` ("10-19", "0,5-7", "" for none) -> sorted layer indices, each checked against the source."""
    layers = parse_layers(text, num_layers, f"--dense-layers {text!r}")
    if len(layers) == num_layers:
        raise UpcycleError(f"--dense-layers {text!r} keeps every layer dense: nothing would be converted.")
    return sorted(layers)


def parse_layer_top_k(entries: list[str], source_config, top_k: int, dense_layers: list[int]) -> list[int] | None:
    """`--layer-top-k K:LAYERS ...` (e.g. "1:3-4,7,21") -> k of every layer (`layer_num_experts_per_tok`), `top_k`
    where no entry names the layer; None without entries. A layer's k must keep some of its group's r heads out
    (1 <= k < r) and split the M = K * ceil(r / K) experts of a --top-k K conversion into equal blocks."""
    if not entries:
        return None
    num_layers = source_config.num_hidden_layers
    r = source_config.num_attention_heads // source_config.num_key_value_heads
    M = top_k * -(-r // top_k)
    allowed = [k for k in range(1, r) if M % k == 0]
    per_layer, named = [top_k] * num_layers, set()
    for entry in entries:
        k_text, colon, layers_text = entry.partition(":")
        if not colon or not k_text.strip().isdigit():
            raise UpcycleError(f"--layer-top-k {entry!r} is not K:LAYERS; give a k and the layers that get it, e.g. "
                               f"1:3-4,7 (k = 1 in layers 3, 4 and 7).")
        k = int(k_text)
        if k not in allowed:
            raise UpcycleError(f"--layer-top-k {entry!r}: k = {k} cannot be laid out in a --top-k {top_k} conversion "
                               f"of this source (r = {r} heads per group, M = {M} experts): a layer's k must be "
                               f"below r and divide M. Choose among {allowed}.")
        layers = parse_layers(layers_text, num_layers, f"--layer-top-k {entry!r}")
        if not layers:
            raise UpcycleError(f"--layer-top-k {entry!r} names no layer; give the layers after the colon, e.g. "
                               f"{k}:3-4,7.")
        clash = sorted((named | set(dense_layers)) & set(layers))
        if clash:
            raise UpcycleError(f"--layer-top-k {entry!r} names layers {clash} already given a k or kept dense by "
                               f"--dense-layers; name each layer once.")
        named.update(layers)
        for index in layers:
            per_layer[index] = k
    return per_layer


@torch.no_grad()
def copy_dense_attention(weights: dict[str, torch.Tensor], model: GQEForCausalLM) -> None:
    """The layers in `dense_attention_layers` keep the source's query and output projections unchanged (their keys
    and values are copied with the shared weights)."""
    state = model.state_dict()
    for index in model.config.dense_attention_layers:
        prefix = f"model.layers.{index}.self_attn."
        for name in ("q_proj.weight", "q_proj.bias", "o_proj.weight", "o_proj.bias"):
            if prefix + name in state:
                state[prefix + name].copy_(weights.get(prefix + name, torch.zeros_like(state[prefix + name])))


@torch.no_grad()
def build_sparse_initial(source, top_k: int, dense_layers: list[int] | None = None,
                         layer_top_k: list[int] | None = None) -> GQEForCausalLM:
    """Sparse GQE: K slots per group over partitioned blocks of the source heads. Blocks start in head order;
    calibration (fit.py) re-chooses them by importance and fits routers and o_proj. Layers in `dense_layers` keep
    the source's attention (all H heads, `dense_attention_layers`). `layer_top_k` (from `parse_layer_top_k`) gives
    layers a k of their own over the same M = K * ceil(r / K) experts."""
    src = source.config
    check_sparse_top_k(src, top_k)
    H, G = src.num_attention_heads, src.num_key_value_heads
    r = H // G
    width = -(-r // top_k)
    config = gqe_config_from_source(
        src, num_attention_heads=G * top_k * width, num_experts_per_tok=top_k, expert_routing="partitioned",
        gqe_variant="gqe", dense_attention_layers=list(dense_layers or []), dense_num_attention_heads=H,
        layer_num_experts_per_tok=layer_top_k,
    )
    model = unfilled_gqe_model(config)
    weights = llama_named_state_dict(source)
    copy_shared_weights(weights, model)
    copy_dense_attention(weights, model)
    M = config.num_experts_per_group
    for index, layer in enumerate(model.model.layers):
        if config.is_dense_attention_layer(index):
            continue
        k = config.num_experts_per_tok_of(index)
        blocks = [sparse_blocks(list(range(r)), k, M // k) for _ in range(G)]
        source_attn = SourceAttention.of_layer(weights, index, H, config.head_dim)
        set_sparse_experts(layer.self_attn, source_attn, blocks)
        init_shared_head(layer.self_attn, source_attn)
    return model


@torch.no_grad()
def head_dropping_baseline(source, keep_per_group: int, seed: int = 0):
    """The naive alternative to a calibrated sparse conversion: a copy of the source in which, in every layer,
    `r - keep_per_group` random query heads of each group are dropped (their output projection zeroed)."""
    import copy

    baseline = copy.deepcopy(source).eval()
    config = baseline.config
    H, G = config.num_attention_heads, config.num_key_value_heads
    r, d = H // G, head_dim_of(config)
    generator = torch.Generator().manual_seed(seed)
    for layer in baseline.model.layers:
        o_weight = layer.self_attn.o_proj.weight.view(-1, H, d)
        for g in range(G):
            dropped = torch.randperm(r, generator=generator)[: r - keep_per_group]
            o_weight[:, g * r + dropped] = 0
    return baseline
