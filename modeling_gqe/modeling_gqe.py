# Copyright 2026 The GQE authors. Licensed under the Apache License, Version 2.0.
"""Grouped Query Experts (GQE): a Llama-style decoder whose query heads are routed experts.

Inside each grouped-query-attention group a router picks, per token, k of the group's M query-head experts.
Only the selected experts' queries are attended: they are packed as k query heads per KV head and
sent through one call of the configured attention backend (eager, sdpa, flash, flex), exactly like a GQA
attention with k query heads per group. Keys and values stay dense: the KV cache is GQA's, plus one KV head per
layer for the "gqe" variant's shared head (the mean over groups of K and V, cached so it is never recomputed, except
in caches that transformers sizes from the config ahead of time).

This file is self-contained (imports from `transformers` and `.configuration_gqe` only) so that it can
travel inside a `trust_remote_code` checkpoint folder.

Shapes: B batch, T query tokens, S key tokens, D hidden size, G KV heads (groups), M experts per group,
k selected experts per group, d head_dim.
"""

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_gqe import GQEConfig


# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache` (its `generate`
# passes `cache=`, older versions pass `past_key_values=`). The model accepts both names and speaks to transformers
# in the name the installed version uses.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# Copied from transformers.models.llama.modeling_llama.LlamaRMSNorm with Llama->GQE
class GQERMSNorm(nn.Module):
    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# Copied from transformers.models.llama.modeling_llama.LlamaRotaryEmbedding with Llama->GQE
class GQERotaryEmbedding(nn.Module):
    def __init__(self, config: GQEConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config

        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)

        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: GQEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# Copied from transformers.models.llama.modeling_llama.rotate_half
def rotate_half(x):
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# Copied from transformers.models.llama.modeling_llama.apply_rotary_pos_emb
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Rotary position embedding; cos/sin are [B, T, d] and get a heads axis at `unsqueeze_dim`
    (1 for [B, heads, T, d] tensors, 2 for [B, T, heads, d])."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


# Copied from transformers.models.llama.modeling_llama.LlamaMLP with Llama->GQE
class GQEMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# Copied from transformers.models.llama.modeling_llama.repeat_kv
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, d] -> [B, kv_heads * n_rep, S, d], each KV head repeated for its n_rep query heads."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


# Copied from transformers.models.llama.modeling_llama.eager_attention_forward
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def select_experts(router_probs: torch.Tensor, top_k: int, expert_routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick k experts per group from `router_probs` [..., G, M] (softmax over each group's M experts).

    Returns `(top_probs, top_index)`, both [..., G, k]; `top_index` counts within the group (0..M-1).
    "ranked": slot j holds the j-th most probable expert. "partitioned": the M experts form k consecutive
    blocks and slot j holds the most probable expert of block j.
    """
    if expert_routing == "ranked":
        if top_k == 1:  # the same pick; top-k over M = 2 took 302 us at 32k tokens on an H200, a max < 50 us
            return router_probs.max(dim=-1, keepdim=True)
        return torch.topk(router_probs, top_k, dim=-1)
    *lead, num_experts = router_probs.shape
    block = num_experts // top_k
    top_probs, index_in_block = router_probs.view(*lead, top_k, block).max(dim=-1)
    block_start = torch.arange(0, num_experts, block, device=router_probs.device)
    return top_probs, index_in_block + block_start


class GQETopKRouter(nn.Module):
    """Per-group softmax router: `x W_r` [.., G*M] -> probabilities over each group's M experts, in fp32."""

    def __init__(self, config: GQEConfig, layer_idx: int):
        super().__init__()
        self.num_groups = config.num_key_value_heads
        self.experts_per_group = config.num_experts_per_group
        self.top_k = config.num_experts_per_tok_of(layer_idx)
        self.expert_routing = config.expert_routing
        # Zero-initialised (paper): uniform probabilities at the start.
        self.weight = nn.Parameter(torch.zeros(self.num_groups * self.experts_per_group, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        # fp32 logits and softmax: the selection must not flip with bf16 rounding.
        router_logits = F.linear(hidden_states.float(), self.weight.float())  # [B, T, G*M]
        router_probs = router_logits.view(*router_logits.shape[:-1], self.num_groups, self.experts_per_group)
        router_probs = router_probs.softmax(dim=-1)  # [B, T, G, M]
        top_probs, top_index = select_experts(router_probs, self.top_k, self.expert_routing)  # [B, T, G, k]
        return router_logits.reshape(-1, router_logits.shape[-1]), top_probs, top_index


class GQESharedHeadAttention(nn.Module):
    """What the attention backends read from a module, for the shared head's own call (prefill with k > 1): one
    query head on one KV head. Holds no parameters (`q_shared` lives on `GQEAttention`)."""

    def __init__(self, config: GQEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_key_value_groups = 1
        self.is_causal = True


def cache_holds_groups_only(cache, layer_idx: int, num_groups: int) -> bool:
    """Whether `cache` stores only the G groups' KV heads for this layer, not the "gqe" variant's shared head as
    head G. Caches that transformers sizes from `config.num_key_value_heads` before the model runs do: continuous
    batching's paged cache, and a static cache initialised ahead of time (ExecuTorch export, chunked prefill).
    Caches filled from the model's own keys (dynamic, and static initialised on first use) hold the shared head."""
    if cache is None:
        return False
    if isinstance(cache, PagedAttentionCache):
        return True
    layers = getattr(cache, "layers", ())
    if layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", False):
        return False
    keys = getattr(layers[layer_idx], "keys", None)
    return keys is not None and keys.dim() == 4 and keys.shape[1] == num_groups  # [B, heads, S, d]


# Continuous batching's paged cache takes its read and write indices as arguments up to transformers 5.18 (and returns
# [S, heads, d]); from 5.19 it reads them from the attention kwargs, like a model's other caches are given them.
PAGED_CACHE_TAKES_INDICES = "read_index" in inspect.signature(PagedAttentionCache.update).parameters


def update_cache(cache, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict):
    """Writes this step's keys and values [B, heads, T, d] into `cache` and returns every cached position's,
    [B, heads, S, d]. `kwargs` are the attention kwargs: the paged cache finds its indices there and, from transformers
    5.19, fills in the attention backend's arguments; the other caches ignore them."""
    if PAGED_CACHE_TAKES_INDICES and isinstance(cache, PagedAttentionCache):
        keys, values = cache.update(
            key_states, value_states, layer_idx, read_index=kwargs["read_index"], write_index=kwargs["write_index"]
        )  # [S, heads, d]: one packed sequence
        return keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
    return cache.update(key_states, value_states, layer_idx, kwargs=kwargs)


class GQEAttentionLayer(nn.Module):
    """What a decoder layer's attention is: routed experts (`GQEAttention`) or, for the config's
    `dense_attention_layers`, plain GQA (`GQEDenseAttention`). The `attentions` output recorder hooks this one class,
    so both kinds are recorded in layer order (a list of two recorders loses layers on transformers 5.5)."""


class GQEAttention(GQEAttentionLayer):
    """Grouped Query Experts attention (arXiv 2606.20945, Section 3).

    Per token, the router picks k of the M experts of each of the G groups. Only the selected experts' queries are
    attended: they are packed group-major as G*k heads, k per KV head, for one backend call with
    `num_key_value_groups = k`. Output slots, concatenated and projected by `o_proj`: G*k hard slots (group-major,
    rank order), then for the "gqe" variant the probability-weighted sum of the selected heads and the shared head.

    The shared head ("gqe") attends to the mean over groups of the rotated keys and of the values. That mean is
    one more KV head (G + 1 in the cache, computed once per token), so with k = 1 the shared query is simply one
    more head of the same call: G + 1 query heads on G + 1 KV heads. With k > 1 it gets a call of its own in
    prefill, and joins the routed call (repeated to k heads) when decoding. Caches that transformers sizes from
    `config.num_key_value_heads` before the model runs (continuous batching's paged cache, ExecuTorch's static
    cache) hold the G groups' heads only; with them the mean is taken over the cached keys and values after each
    read.

    Returns the layer's output [B, T, D] and the attention weights where the backend gives them (eager):
    [B, G*k (+1), T, S], one row per attended query head in the order above, the shared head last.
    """

    def __init__(self, config: GQEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_groups = config.num_key_value_heads
        self.experts_per_group = config.num_experts_per_group
        self.top_k = config.num_experts_per_tok_of(layer_idx)
        self.variant = config.gqe_variant
        self.has_shared_head = self.variant == "gqe"
        # Read by the attention backends: the packed call has k query heads per KV head. With k = 1 the shared
        # head joins that call; with k > 1 it has a call of its own (GQESharedHeadAttention).
        self.num_key_value_groups = self.top_k
        self.shared_head_in_routed_call = self.has_shared_head and self.top_k == 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        d, D, bias = self.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, config.num_attention_heads * d, bias=bias)  # expert e = g*M + m
        self.k_proj = nn.Linear(D, self.num_groups * d, bias=bias)
        self.v_proj = nn.Linear(D, self.num_groups * d, bias=bias)
        self.router = GQETopKRouter(config, layer_idx)
        if self.has_shared_head:
            self.q_shared = nn.Linear(D, d, bias=bias)
            self.shared_head_attention = GQESharedHeadAttention(config, layer_idx)
        self.o_proj = nn.Linear(config.num_output_slots_of(layer_idx) * d, D, bias=bias)

    def selected_queries(self, hidden_states: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
        """Queries of the selected experts, [B, T, G*k, d] (group-major, slot order), from [B, T, D] and the
        router's [B, T, G, k] picks: one dense projection, then a gather.

        Only the selected queries are attended. The projection itself stays dense: with more than a handful of
        tokens every expert is selected by some token, and for a single decoded token, gathering the selected
        experts' weight rows first copies them, which costs more than the dense matrix-vector product it saves
        (bench/RESULTS.md, "Decode")."""
        batch, seq_len = hidden_states.shape[:-1]
        G, M, k, d = self.num_groups, self.experts_per_group, self.top_k, self.head_dim
        all_queries = self.q_proj(hidden_states).view(batch, seq_len, G, M, d)
        selected = torch.gather(all_queries, 3, top_index.unsqueeze(-1).expand(-1, -1, -1, -1, d))  # [B, T, G, k, d]
        return selected.view(batch, seq_len, G * k, d)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        batch, seq_len = hidden_states.shape[:-1]
        G, k, d = self.num_groups, self.top_k, self.head_dim

        _, top_probs, top_index = self.router(hidden_states)  # [B, T, G, k] each
        query_states = self.selected_queries(hidden_states, top_index)  # [B, T, G*k, d]
        key_states = self.k_proj(hidden_states).view(batch, seq_len, G, d)
        value_states = self.v_proj(hidden_states).view(batch, seq_len, G, d)
        if self.has_shared_head:
            query_states = torch.cat([query_states, self.q_shared(hidden_states).view(batch, seq_len, 1, d)], dim=2)

        # RoPE while heads are the inner dimension: elementwise ops on contiguous tensors are ~3x faster on CPU.
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, unsqueeze_dim=2)
        # The shared head's K/V: the mean over groups of the rotated keys (RoPE rotates every head alike, so this is
        # the rotated mean key) and of the values, appended as KV head G and cached with the others; but a cache
        # sized for G heads before the model ran keeps the groups' heads only, and the mean is taken after reading it.
        shared_kv_after_cache = self.has_shared_head and cache_holds_groups_only(cache, self.layer_idx, G)
        if self.has_shared_head and not shared_kv_after_cache:
            key_states = torch.cat([key_states, key_states.mean(dim=2, keepdim=True)], dim=2)
            value_states = torch.cat([value_states, value_states.mean(dim=2, keepdim=True)], dim=2)
        query_states = query_states.transpose(1, 2)  # [B, G*k (+1 shared), T, d]
        key_states = key_states.transpose(1, 2)  # [B, G (+1 shared), T, d]
        value_states = value_states.transpose(1, 2)

        if cache is not None:
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, kwargs)
        if shared_kv_after_cache:
            if kwargs.get("block_table") is not None:
                raise NotImplementedError(
                    "The 'gqe' variant's shared head attends to the mean of the cached keys and values, which a "
                    "paged cache read through a block table (continuous batching with flash attention) does not "
                    "return. Load the model with attn_implementation='sdpa' for continuous batching."
                )
            key_states = torch.cat([key_states, key_states.mean(dim=1, keepdim=True)], dim=1)  # [B, G + 1, S, d]
            value_states = torch.cat([value_states, value_states.mean(dim=1, keepdim=True)], dim=1)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attention_kwargs = dict(
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,
            **kwargs,
        )
        if not self.has_shared_head or self.shared_head_in_routed_call:
            attn_output, attn_weights = attention_interface(
                self, query_states, key_states, value_states, attention_mask, **attention_kwargs
            )  # [B, T, G*k (+1), d]
        elif seq_len == 1:
            # Decoding with k > 1: the shared query, repeated to k heads, joins the routed call on KV head G. The
            # cache is then read once and never sliced (a slice of it would be copied); the k - 1 repeats add no
            # memory traffic, which is what a decode step is bound by.
            queries = torch.cat([query_states, query_states[:, G * k :].expand(-1, k - 1, -1, -1)], dim=1)
            attn_output, attn_weights = attention_interface(
                self, queries, key_states, value_states, attention_mask, **attention_kwargs
            )  # [B, 1, (G+1)*k, d]: the shared head's output is at G*k
            if attn_weights is not None:
                attn_weights = attn_weights[:, : G * k + 1]  # without the shared head's repeats
        else:
            # Prefill with k > 1: the routed heads on KV heads 0..G-1 and the shared head on KV head G, in two calls,
            # so no attention is spent on repeats.
            routed_output, attn_weights = attention_interface(
                self, query_states[:, : G * k], key_states[:, :G], value_states[:, :G], attention_mask,
                **attention_kwargs,
            )
            shared_output, shared_weights = attention_interface(
                self.shared_head_attention, query_states[:, G * k :], key_states[:, G:], value_states[:, G:],
                attention_mask, **attention_kwargs,
            )
            attn_output = torch.cat([routed_output, shared_output], dim=2)  # [B, T, G*k + 1, d]
            if attn_weights is not None and shared_weights is not None:
                attn_weights = torch.cat([attn_weights, shared_weights], dim=1)

        routed_output = attn_output[:, :, : G * k]  # [B, T, G*k, d]
        if self.variant == "weighted_concat":
            routed_output = routed_output * top_probs.view(batch, seq_len, G * k, 1).to(routed_output.dtype)
        slots = [routed_output.reshape(batch, seq_len, G * k * d)]
        if self.has_shared_head:
            # Weighted slot: the router's gradient path from the LM loss. Weights normalised over all G*k picks.
            # An elementwise product and a sum: as a matmul, one tiny [1, G*k] x [G*k, d] product per token is a
            # batched GEMM that costs a GPU several times more (bench/RESULTS.md).
            weights = (top_probs / top_probs.sum(dim=(-2, -1), keepdim=True)).view(batch, seq_len, G * k, 1)
            slots.append((weights.to(routed_output.dtype) * routed_output).sum(dim=2))  # [B, T, d]
            slots.append(attn_output[:, :, G * k])  # shared head
        attn_output = self.o_proj(torch.cat(slots, dim=-1))  # [B, T, D]
        return attn_output, attn_weights


class GQEDenseAttention(GQEAttentionLayer):
    """Plain grouped-query attention, Llama's, for the layers in `config.dense_attention_layers`: all
    `dense_num_attention_heads` query heads attended on the `num_key_value_heads` KV heads, no router. An upcycled
    checkpoint keeps the source's attention here, weights unchanged.

    Returns the layer's output [B, T, D] and the attention weights where the backend gives them (eager)."""

    def __init__(self, config: GQEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.dense_num_attention_heads
        self.num_key_value_groups = self.num_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        d, D, bias = self.head_dim, config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(D, config.num_key_value_heads * d, bias=bias)
        self.v_proj = nn.Linear(D, config.num_key_value_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, D, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        batch, seq_len = hidden_states.shape[:-1]
        query_states = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)  # [B, T, H, d]
        key_states = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)  # [B, T, G, d]
        value_states = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, unsqueeze_dim=2)
        query_states, key_states, value_states = (x.transpose(1, 2) for x in (query_states, key_states, value_states))
        if cache is not None:
            key_states, value_states = update_cache(cache, key_states, value_states, self.layer_idx, kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,
            **kwargs,
        )  # [B, T, H, d]
        attn_output = self.o_proj(attn_output.reshape(batch, seq_len, -1))  # [B, T, D]
        return attn_output, attn_weights


class GQEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: GQEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        attention_class = GQEDenseAttention if config.is_dense_attention_layer(layer_idx) else GQEAttention
        self.self_attn = attention_class(config=config, layer_idx=layer_idx)
        self.mlp = GQEMLP(config)
        self.input_layernorm = GQERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GQERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],  # the cache arrives here, under CACHE_ARG
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


@auto_docstring
class GQEPreTrainedModel(PreTrainedModel):
    config: GQEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GQEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": GQEDecoderLayer,
        "attentions": OutputRecorder(GQEAttentionLayer, index=1),
        "router_logits": OutputRecorder(GQETopKRouter, index=0),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GQETopKRouter):
            init.zeros_(module.weight)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes `auto_map` for the saved class alone, so a folder saved from GQEForCausalLM would not
        # load with AutoModelForSequenceClassification(..., trust_remote_code=True). Every GQE class lives in this
        # file, which travels with the folder: map them all.
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            every_class = {auto_class: f"{module}.{name}" for auto_class, name in AUTO_CLASS_NAMES.items()}
            self.config.auto_map = {**every_class, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)


@auto_docstring
class GQEModel(GQEPreTrainedModel):
    def __init__(self, config: GQEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GQEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = GQERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = GQERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache (a standard transformers `Cache`): filled with this call's keys and values and read back.
        past_key_values (`Cache`, *optional*):
            The name of `cache` before transformers 5.24, whose `generate` passes it so; either name works.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds: torch.Tensor = self.embed_tokens(input_ids)

        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_ARG: cache},
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARG: cache},
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


def routed_layers_top_k(config: GQEConfig) -> list[int]:
    """k of each layer that has a router, in layer order: the layers whose `router_logits` the model records."""
    return [
        config.num_experts_per_tok_of(index)
        for index in range(config.num_hidden_layers)
        if not config.is_dense_attention_layer(index)
    ]


def routing_statistics(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_key_value_heads: int,
    num_experts_per_tok: int | list[int],
    expert_routing: str = "ranked",
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    r"""Which experts the routers picked and how evenly, per layer; differentiable (the load-balancing loss is
    built on it), so wrap it in `torch.no_grad()` for monitoring.

    Args:
        router_logits: one [B*T, G*M] tensor per layer, as recorded from `GQETopKRouter`
            (`output_router_logits=True`).
        num_key_value_heads: G.
        num_experts_per_tok: k, or one k per entry of `router_logits` (`routed_layers_top_k(config)` for a
            model with `layer_num_experts_per_tok`).
        expert_routing: "ranked" or "partitioned", the selection rule used by the model.
        attention_mask: [B, T] (or [B, past + T]: the last T columns are used), 1 for real tokens; padding is left
            out of the fractions, means and entropies.

    Returns a dict of tensors, L = layers, N = B*T tokens:
        "selected_experts": [L, N, G, k], the expert (index within its group, 0..M-1) in each slot; where the
            layers' k differ, a tuple of one [N, G, k] tensor per layer.
        "selected_fraction": [L, G, M], the fraction of tokens whose selection includes expert m of group g
            (sums to k over m; divided by k it is the expert's share of its group's picks).
        "mean_probability": [L, G, M], the mean router probability.
        "entropy": [L], the mean entropy of the groups' router distributions, normalised to 1 for uniform.
    """
    if not isinstance(num_experts_per_tok, int):
        if len(num_experts_per_tok) != len(router_logits):
            raise ValueError(
                f"num_experts_per_tok lists {len(num_experts_per_tok)} values for {len(router_logits)} layers of "
                "router logits; give one k per routed layer (routed_layers_top_k(config))."
            )
        if len(set(num_experts_per_tok)) > 1:  # layers differ in k: each on its own, then stacked where shapes allow
            per_layer = [
                routing_statistics((logits,), num_key_value_heads, k, expert_routing, attention_mask)
                for logits, k in zip(router_logits, num_experts_per_tok)
            ]
            statistics = {name: torch.cat([layer[name] for layer in per_layer]) for name in per_layer[0]
                          if name != "selected_experts"}
            return {"selected_experts": tuple(layer["selected_experts"][0] for layer in per_layer), **statistics}
        num_experts_per_tok = num_experts_per_tok[0] if num_experts_per_tok else 1
    logits = torch.stack([layer_logits.to(router_logits[0].device) for layer_logits in router_logits]).float()
    num_layers, num_tokens = logits.shape[:2]
    router_probs = logits.view(num_layers, num_tokens, num_key_value_heads, -1).softmax(dim=-1)  # [L, N, G, M]
    experts_per_group = router_probs.shape[-1]
    _, selected_experts = select_experts(router_probs, num_experts_per_tok, expert_routing)  # [L, N, G, k]
    selected = torch.zeros_like(router_probs).scatter_(-1, selected_experts, 1.0)

    token_weights = torch.full((num_tokens,), 1.0 / num_tokens, device=logits.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        seq_len = num_tokens // attention_mask.shape[0]
        real = attention_mask[:, -seq_len:].reshape(-1).to(device=logits.device, dtype=torch.float32)
        token_weights = real / real.sum().clamp(min=1.0)
    entropy = -(router_probs * router_probs.clamp_min(1e-12).log()).sum(-1)  # [L, N, G]
    if experts_per_group > 1:
        entropy = entropy / math.log(experts_per_group)
    return {
        "selected_experts": selected_experts,
        "selected_fraction": torch.einsum("n,lngm->lgm", token_weights, selected),
        "mean_probability": torch.einsum("n,lngm->lgm", token_weights, router_probs),
        "entropy": torch.einsum("n,lng->l", token_weights, entropy) / num_key_value_heads,
    }


def load_balancing_loss_func(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_key_value_heads: int,
    num_experts_per_tok: int | list[int],
    expert_routing: str = "ranked",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | int:
    r"""Per-group Switch load-balancing loss, summed over layers.

    For each layer: mean over groups g of `M * sum_m f[g, m] * P[g, m]`, where f is the fraction of tokens whose
    selection includes expert m of group g and P the mean router probability (`routing_statistics`); padding
    tokens are excluded. Arguments as for `routing_statistics`.
    """
    if router_logits is None or not isinstance(router_logits, tuple) or len(router_logits) == 0:
        return 0
    statistics = routing_statistics(
        router_logits, num_key_value_heads, num_experts_per_tok, expert_routing, attention_mask
    )
    fraction, probability = statistics["selected_fraction"], statistics["mean_probability"]  # [L, G, M]
    return (fraction.shape[-1] * (fraction * probability).sum(-1).mean(-1)).sum()


@auto_docstring
class GQEForCausalLM(GQEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GQEConfig):
        super().__init__(config)
        self.model = GQEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache (a standard transformers `Cache`): filled with this call's keys and values and read back.
        past_key_values (`Cache`, *optional*):
            The name of `cache` before transformers 5.24, whose `generate` passes it so; either name works.
        output_router_logits (`bool`, *optional*):
            Return every layer's router logits and the load-balancing `aux_loss`. While training with `labels`
            they are always collected, and `router_aux_loss_coef * aux_loss` is added to the loss.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        balance_routing = labels is not None and self.training and self.config.router_aux_loss_coef > 0
        output_router_logits = output_router_logits or balance_routing

        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        # Only compute necessary logits (transformers < 5.20 has no `slice_logits_to_keep` helper).
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.num_key_value_heads,
                routed_layers_top_k(self.config),
                self.config.expert_routing,
                attention_mask,
            )
            if balance_routing:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


class GQEForSequenceClassification(GenericForSequenceClassification, GQEPreTrainedModel):
    def __init__(self, config: GQEConfig):
        # Build GQEModel directly: the generic head's `AutoModel.from_config` needs the Auto registration,
        # which a `trust_remote_code` load does not have.
        GQEPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = GQEModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class GQEForTokenClassification(GenericForTokenClassification, GQEPreTrainedModel):
    def __init__(self, config: GQEConfig):
        # GQEModel built directly, as in GQEForSequenceClassification; the head is the generic one's.
        GQEPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = GQEModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.post_init()


class GQEForQuestionAnswering(GenericForQuestionAnswering, GQEPreTrainedModel):
    # The base model sits under "model", as in every other GQE class (Llama's QA head keeps "transformer" for old
    # checkpoints; GQE has none).
    def __init__(self, config: GQEConfig):
        GQEPreTrainedModel.__init__(self, config)
        self.model = GQEModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


# Auto class -> GQE class, for the `auto_map` of trust_remote_code folders (GQEPreTrainedModel.save_pretrained).
AUTO_CLASS_NAMES = {
    "AutoModel": "GQEModel",
    "AutoModelForCausalLM": "GQEForCausalLM",
    "AutoModelForSequenceClassification": "GQEForSequenceClassification",
    "AutoModelForTokenClassification": "GQEForTokenClassification",
    "AutoModelForQuestionAnswering": "GQEForQuestionAnswering",
}


__all__ = [
    "GQEPreTrainedModel",
    "GQEModel",
    "GQEForCausalLM",
    "GQEForSequenceClassification",
    "GQEForTokenClassification",
    "GQEForQuestionAnswering",
    "load_balancing_loss_func",
    "routed_layers_top_k",
    "routing_statistics",
]
