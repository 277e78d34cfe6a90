"""Grouped Query Experts for vLLM, built from vLLM's parallel layers, and sharded by KV group.

It reads the same config (`modeling_gqe.GQEConfig`) and checkpoint names as the transformers model and is
tested against it (tests/test_vllm.py; the sharding arithmetic in tests/test_vllm_sharding.py). Everything
outside attention is vLLM's own Llama (embedding, RMSNorm, MLP, LM head), with this attention in its decoder
layers. Per token and KV group g, the router picks k of the group's M query-head experts; the selected queries
are attended in one vLLM attention layer, G*k query heads on the G KV heads. The "gqe" variant's shared head
attends to the mean over groups of the rotated keys and values, computed once per token and cached, never
recomputed over the history: it is one more head of the fused q/k/v projection, whose key and value rows are
the mean of the groups' k_proj and v_proj rows (averaged once, at load). With k = 1 the shared head is one more
head of the routed attention layer (G + 1 query heads on G + 1 KV heads: one attention call and one paged cache
per layer); with k > 1 it has its own attention layer and paged cache (one head), since joining the routed call
would mean repeating its query k times, k times its attention work in prefill. Layers listed in the config's
`dense_attention_layers` are plain grouped-query attention, vLLM's Llama attention with the config's
`dense_num_attention_heads` (`GQEDenseAttention`: no router, the checkpoint's Llama names), as in the transformers
model; a config's `layer_num_experts_per_tok` gives each routed layer its own k (its attention layers and o_proj
are sized by it).

Tensor parallelism: each rank owns G/N whole groups (their experts' query rows, their router rows, their KV
head and their hard output slots), so it needs N to divide G; the shared head's query, key and value rows are
on every rank. One thing spans all groups: the weighted slot's normaliser (the sum of every selected
probability), one all-reduce of a number per token. The output projection then sums, across ranks, each rank's
hard slots, its partial weighted slot and (rank 0 only) the shared slot.

Shapes: T tokens (all sequences of the step), D hidden size, G KV groups (Gl = G / tensor-parallel size on
this rank), M experts per group, k selected per group, d head_dim.
"""

import torch
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index

from .servable import check_servable
from .sharding import projection_layout, rank_output_columns, rank_projection_rows


def pick_experts(router_probs: torch.Tensor, top_k: int, expert_routing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, Gl, M] probabilities -> (probabilities, experts), each [T, Gl, k]. "ranked": the k most probable, in
    rank order. "partitioned": the most probable of each of k consecutive blocks of M/k experts, in block order."""
    if expert_routing == "ranked":
        return router_probs.topk(top_k, dim=-1)
    tokens, groups, experts = router_probs.shape
    width = experts // top_k
    best_probs, best_in_block = router_probs.view(tokens, groups, top_k, width).max(dim=-1)
    return best_probs, best_in_block + torch.arange(0, experts, width, device=router_probs.device)


class GQEOutputProjection(RowParallelLinear):
    """`o_proj` over this rank's slots: its groups' G/N*k hard slots, then (variant "gqe") its partial weighted
    slot and the shared slot. Loads the checkpoint's [D, S*d] weight by slot: the rank's hard columns, the weighted
    columns on every rank (each rank's input is a partial sum), the shared columns on rank 0 only (zero elsewhere:
    the shared head's output is the same on every rank and must count once). The bias is added on rank 0."""

    def __init__(self, config, prefix: str, quant_config: QuantizationConfig | None = None):
        tp_size = get_tensor_model_parallel_world_size()
        d = config.head_dim
        top_k = config.num_experts_per_tok_of(extract_layer_index(prefix))  # the layer's own k
        self.num_groups, self.top_k, self.head_dim = config.num_key_value_heads, top_k, d
        self.has_shared_head = config.gqe_variant == "gqe"
        self.hard_width = config.num_key_value_heads // tp_size * top_k * d
        self.extra_width = 2 * d if config.gqe_variant == "gqe" else 0
        super().__init__(
            input_size=tp_size * (self.hard_width + self.extra_width), output_size=config.hidden_size,
            bias=config.attention_bias, input_is_parallel=True, quant_config=quant_config, prefix=prefix,
        )

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.dim() == 1:  # bias: every rank holds it, only rank 0 adds it
            param.data.copy_(loaded_weight)
            return
        param.data.copy_(rank_output_columns(loaded_weight, self.num_groups, self.top_k, self.head_dim,
                                             self.has_shared_head, self.tp_rank, self.tp_size))

    weight_loader_v2 = weight_loader


class GQEQKVProjection(ColumnParallelLinear):
    """q_proj (every expert of the rank's groups), k_proj and v_proj in one matmul, with (variant "gqe") the shared
    head's query, key and value as one more head each: `projection_layout` gives the rank's rows. The shared key
    and value rows are the mean of all G groups' k_proj and v_proj rows, averaged when k_proj and v_proj load, so
    the shared head's K/V cost one head of projection per token, on every rank, with no all-reduce."""

    def __init__(self, config, prefix: str, quant_config: QuantizationConfig | None = None):
        tp_size = get_tensor_model_parallel_world_size()
        self.num_groups = config.num_key_value_heads
        self.has_shared_head = config.gqe_variant == "gqe"
        self.layout = projection_layout(config.num_key_value_heads // tp_size, config.num_experts_per_group,
                                        config.head_dim, self.has_shared_head)
        rank_rows = max(piece.stop for piece in self.layout.values())
        super().__init__(input_size=config.hidden_size, output_size=tp_size * rank_rows, bias=config.attention_bias,
                         gather_output=False, quant_config=quant_config, prefix=prefix)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str | None = None):
        """Loads q_proj, q_shared, k_proj or v_proj (the checkpoint name's shard id, set by `GQEForCausalLM`'s
        weight-name mapper) into the rank's rows of this layer's weight or bias."""
        checkpoint_tensor = loaded_shard_id or getattr(loaded_weight, "shard_id", None)
        if checkpoint_tensor not in ("q", "q_shared", "k", "v"):
            raise ValueError(f"{self.prefix}: no GQE projection rows for shard {checkpoint_tensor!r}")
        rows = rank_projection_rows(loaded_weight, checkpoint_tensor, self.num_groups, self.has_shared_head,
                                    self.tp_rank, self.tp_size)
        for piece, piece_rows in rows.items():
            param.data[self.layout[piece]].copy_(piece_rows)

    weight_loader_v2 = weight_loader


class GQEAttention(nn.Module):
    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        **unused,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.tp_size = tp_size
        self.head_dim = d = config.head_dim
        self.num_groups = config.num_key_value_heads
        self.local_groups = self.num_groups // tp_size
        self.experts_per_group = config.num_experts_per_group
        self.top_k = config.num_experts_per_tok_of(extract_layer_index(prefix))  # `layer_num_experts_per_tok`
        self.variant = config.gqe_variant
        self.expert_routing = config.expert_routing
        self.has_shared_head = self.variant == "gqe"
        scaling = d**-0.5

        # Every query expert of the rank's groups, the shared query, the keys and values (with the shared head's):
        # the checkpoint's q_proj / q_shared / k_proj / v_proj in one matmul.
        self.qkv_proj = GQEQKVProjection(config, prefix=f"{prefix}.qkv_proj", quant_config=quant_config)
        extra_head = int(self.has_shared_head)
        self.q_size = (self.local_groups * self.experts_per_group + extra_head) * d
        self.kv_size = (self.local_groups + extra_head) * d
        # The router in fp32 (its softmax and selection must not flip with bf16 rounding); rows of the rank's groups.
        self.router = ColumnParallelLinear(
            hidden_size, self.num_groups * self.experts_per_group, bias=False, gather_output=False,
            params_dtype=torch.float32, prefix=f"{prefix}.router",
        )
        self.o_proj = GQEOutputProjection(config, prefix=f"{prefix}.o_proj", quant_config=quant_config)
        self.rotary_emb = get_rope(d, max_position=max_position_embeddings, is_neox_style=True,
                                   rope_parameters=getattr(config, "rope_parameters", None))
        sliding_window = getattr(config, "sliding_window", None)
        # k = 1: the shared head joins the routed call as KV head Gl (every rank keeps its copy of it; o_proj
        # counts its output once, on rank 0).
        self.shared_in_routed_call = self.has_shared_head and self.top_k == 1
        extra_head = int(self.shared_in_routed_call)
        self.attn = Attention(
            self.local_groups * self.top_k + extra_head, d, scaling, num_kv_heads=self.local_groups + extra_head,
            cache_config=cache_config, quant_config=quant_config, per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )
        if self.has_shared_head and not self.shared_in_routed_call:
            self.shared_attn = Attention(
                1, d, scaling, num_kv_heads=1, cache_config=cache_config, quant_config=quant_config,
                per_layer_sliding_window=sliding_window, prefix=f"{prefix}.shared_attn",
            )

    def all_groups_sum(self, local_sum: torch.Tensor) -> torch.Tensor:
        return tensor_model_parallel_all_reduce(local_sum) if self.tp_size > 1 else local_sum

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        Gl, M, k, d = self.local_groups, self.experts_per_group, self.top_k, self.head_dim

        router_logits, _ = self.router(hidden_states.float())  # [T, Gl*M], fp32
        top_probs, top_index = pick_experts(router_logits.view(tokens, Gl, M).softmax(dim=-1), k, self.expert_routing)

        # keys, values: [T, (Gl + 1) * d] for "gqe" (the shared head's K/V is head Gl), else [T, Gl * d].
        qkv, _ = self.qkv_proj(hidden_states)
        all_queries, keys, values = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        expert_queries = all_queries[:, : Gl * M * d].reshape(tokens, Gl, M, d)
        queries = expert_queries.gather(2, top_index.unsqueeze(-1).expand(-1, -1, -1, d)).reshape(tokens, Gl * k * d)
        if self.has_shared_head:
            queries = torch.cat([queries, all_queries[:, Gl * M * d :]], dim=-1)  # [T, (Gl*k + 1) * d]
        # The shared key is rotated with the others: the rotated mean key is the mean of the rotated keys.
        queries, keys = self.rotary_emb(positions, queries, keys)

        if not self.has_shared_head or self.shared_in_routed_call:
            attended = self.attn(queries, keys, values).view(tokens, -1, d)
            routed = attended[:, : Gl * k]
            shared = attended[:, Gl * k] if self.has_shared_head else None
        else:
            routed = self.attn(queries[:, : Gl * k * d].contiguous(), keys[:, : Gl * d], values[:, : Gl * d])
            routed = routed.view(tokens, Gl * k, d)
            shared = self.shared_attn(queries[:, Gl * k * d :].contiguous(), keys[:, Gl * d :].contiguous(),
                                      values[:, Gl * d :].contiguous())
        if self.variant == "weighted_concat":
            routed = routed * top_probs.view(tokens, Gl * k, 1).to(routed.dtype)
        slots = [routed.reshape(tokens, Gl * k * d)]
        if self.has_shared_head:
            # Weighted slot: probabilities normalised over the selections of all G groups (all ranks); this
            # rank contributes its groups' part, and o_proj's all-reduce adds the parts.
            total = self.all_groups_sum(top_probs.sum(dim=(1, 2), keepdim=True))  # [T, 1, 1]
            weights = (top_probs / total).view(tokens, 1, Gl * k).to(routed.dtype)
            slots.append(torch.bmm(weights, routed.reshape(tokens, Gl * k, d)).view(tokens, d))
            slots.append(shared.reshape(tokens, d))
        output, _ = self.o_proj(torch.cat(slots, dim=-1))
        return output


class GQEDenseAttention(LlamaAttention):
    """vLLM's Llama attention for the layers in `config.dense_attention_layers`, with their own head count:
    `dense_num_attention_heads` query heads, all attended, on the G KV heads (the decoder layer passes
    `num_attention_heads`, the routed layers' expert count). Sharded by head as vLLM shards Llama, so each rank holds
    whole groups; a sliding window comes from the config through vLLM's cache config, as in the routed layers."""

    def __init__(self, config, num_heads: int, **kwargs) -> None:
        super().__init__(config, num_heads=config.dense_num_attention_heads, **kwargs)


class GQEDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        config = config or vllm_config.model_config.hf_config
        dense = config.is_dense_attention_layer(extract_layer_index(prefix))
        super().__init__(vllm_config, prefix=prefix, config=config,
                         attn_layer_type=GQEDenseAttention if dense else GQEAttention)


class GQEForCausalLM(LlamaForCausalLM):
    """vLLM's Llama causal LM with GQE attention in its decoder layers (plain GQA in `dense_attention_layers`);
    loads `modeling_gqe` checkpoints."""

    # q_shared is stacked into qkv_proj with q_proj, k_proj and v_proj (which also give the shared K/V rows).
    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_stacked={".q_shared": (".qkv_proj", "q_shared")})
    packed_modules_mapping = {"qkv_proj": ["q_proj", "q_shared", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_servable(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=GQEDecoderLayer)
        self.model.hf_to_vllm_mapper = self.hf_to_vllm_mapper  # read by LlamaModel.load_weights
