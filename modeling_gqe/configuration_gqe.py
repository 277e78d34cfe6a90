# Copyright 2026 The GQE authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Grouped Query Experts (GQE) models.

This file is self-contained (it imports only from `transformers`) so that it can travel inside a
`trust_remote_code` checkpoint folder next to `modeling_gqe.py`.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


GQE_VARIANTS = ("gqe", "hard_concat", "weighted_concat")
EXPERT_ROUTINGS = ("ranked", "partitioned")


@strict
class GQEConfig(PreTrainedConfig):
    r"""
    Configuration of a Llama-style decoder whose attention is Grouped Query Experts: inside each of the
    `num_key_value_heads` (G) KV groups, a router picks `num_experts_per_tok` (k) of the group's
    `num_attention_heads // num_key_value_heads` (M) query-head experts per token. The KV heads stay dense,
    so the KV cache is that of the GQA model with the same `num_key_value_heads`, plus one KV head per layer for
    the "gqe" variant's shared head (the mean over groups of the keys and values).

    The defaults are the paper's main model (arXiv 2606.20945): hidden 1024, 16 query-head experts,
    8 KV heads, head_dim 64, k = 1, variant "gqe" (hard slots + weighted slot + shared head), about 250M
    parameters.

    GQE-specific arguments (all Llama arguments are accepted as well):
        num_experts_per_tok (`int`, *optional*, defaults to 1):
            k, the query-head experts selected per token in each KV group, `1 <= k <= M`.
        layer_num_experts_per_tok (`list[int]`, *optional*):
            A k for each layer (`num_hidden_layers` entries, each `1 <= k <= M`), where the layers should not all
            select the same number: a layer's attended heads and `o_proj` width follow its own k. `None` (the
            default) is `num_experts_per_tok` in every layer. The entries of `dense_attention_layers` are not used.
            An upcycled model gives k = 1 to the layers where dropping to one head per group costs least, to pay
            for others (`gqe-upcycle --layer-top-k`; bench/RESULTS.md, "A k per layer in the model").
        gqe_variant (`str`, *optional*, defaults to `"gqe"`):
            `"gqe"`: G*k unweighted slots, one probability-weighted slot and one shared head.
            `"hard_concat"`: the G*k unweighted slots only.
            `"weighted_concat"`: the G*k slots, each multiplied by its router probability.
        expert_routing (`str`, *optional*, defaults to `"ranked"`):
            `"ranked"`: top-k of the group's M experts, slot j holds the j-th most probable.
            `"partitioned"`: the M experts are split into k consecutive blocks and slot j holds the top-1 of
            block j (requires `M % k == 0`). Identical to "ranked" when k = 1; with k = M and
            "hard_concat" the model is exactly a GQA model.
        router_aux_loss_coef (`float`, *optional*, defaults to 0.01):
            Weight of the load-balancing loss (summed over layers) added to the LM loss.
        output_router_logits (`bool`, *optional*, defaults to `False`):
            Return the router logits of every layer (and the aux loss). The aux loss is always computed
            while training with labels.
        sliding_window (`int`, *optional*):
            Mistral-style sliding-window attention on every layer; `None` is full attention.
        dense_attention_layers (`list[int]`, *optional*, defaults to `[]`):
            Indices of layers whose attention is plain grouped-query attention (Llama's) instead of routed experts:
            `dense_num_attention_heads` query heads, all attended, on the same `num_key_value_heads` KV heads, and
            no router. An upcycled model keeps the layers that a sparse conversion costs the most as they were in
            the source (like Qwen2-MoE's `mlp_only_layers` for the MLP).
        dense_num_attention_heads (`int`, *optional*):
            Query heads of the dense layers; defaults to `num_attention_heads`. A multiple of `num_key_value_heads`.

    ```python
    >>> from modeling_gqe import GQEConfig, GQEForCausalLM
    >>> config = GQEConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    >>> model = GQEForCausalLM(config)
    ```"""

    model_type = "gqe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism shards the MLP, Llama's way. The attention stays whole on every rank: the "gqe" variant's
    # shared head attends to the mean over all groups' keys and values, its weighted slot is normalised over every
    # group's picks, and o_proj's last two slots do not split by group, none of which a column or row split provides.
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None
    sliding_window: int | None = None
    # GQE
    num_experts_per_tok: int = 1
    gqe_variant: str = "gqe"
    expert_routing: str = "ranked"
    router_aux_loss_coef: float = 0.01
    output_router_logits: bool = False
    dense_attention_layers: list[int] | None = None
    dense_num_attention_heads: int | None = None
    layer_num_experts_per_tok: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.dense_attention_layers = sorted(self.dense_attention_layers or [])
        if self.dense_num_attention_heads is None:
            self.dense_num_attention_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly or pick a divisible hidden_size."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._validate_gqe()
        super().__post_init__(**kwargs)

    def _validate_gqe(self):
        # Raised here rather than in `validate_architecture` so users get a plain ValueError.
        n, g, k = self.num_attention_heads, self.num_key_value_heads, self.num_experts_per_tok
        if g < 1 or n % g != 0:
            raise ValueError(
                f"num_attention_heads ({n}) must be a multiple of num_key_value_heads ({g}): every KV group "
                f"holds the same number of query-head experts. Set num_key_value_heads to a divisor of {n}."
            )
        m = n // g
        if not 1 <= k <= m:
            raise ValueError(
                f"num_experts_per_tok ({k}) must be between 1 and the experts per KV group, "
                f"num_attention_heads // num_key_value_heads = {m}. Set num_experts_per_tok in [1, {m}]."
            )
        if self.gqe_variant not in GQE_VARIANTS:
            raise ValueError(f"gqe_variant must be one of {GQE_VARIANTS}, got {self.gqe_variant!r}.")
        if self.expert_routing not in EXPERT_ROUTINGS:
            raise ValueError(f"expert_routing must be one of {EXPERT_ROUTINGS}, got {self.expert_routing!r}.")
        if self.expert_routing == "partitioned" and m % k != 0:
            raise ValueError(
                f"expert_routing='partitioned' splits the {m} experts of a group into num_experts_per_tok ({k}) "
                f"equal blocks, so {m} must be divisible by {k}. Choose a divisor of {m} or use "
                f"expert_routing='ranked'."
            )
        self._validate_layer_top_k(m)
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim ({self.head_dim}) must be even: rotary embeddings rotate pairs of dimensions."
            )
        self._validate_dense_layers()
        if self.router_aux_loss_coef < 0:
            raise ValueError(
                f"router_aux_loss_coef ({self.router_aux_loss_coef}) must be >= 0; use 0 to disable load balancing."
            )

    def _validate_dense_layers(self):
        layers, count = self.dense_attention_layers, self.num_hidden_layers
        outside = [index for index in layers if not 0 <= index < count]
        if outside:
            raise ValueError(
                f"dense_attention_layers holds {outside}, outside the model's layers 0..{count - 1} "
                f"(num_hidden_layers = {count}). List layer indices in [0, {count - 1}]."
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"dense_attention_layers lists a layer more than once: {layers}. List each layer once.")
        heads, g = self.dense_num_attention_heads, self.num_key_value_heads
        if heads < 1 or heads % g != 0:
            raise ValueError(
                f"dense_num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({g}): "
                f"the dense layers are grouped-query attention on the same KV heads."
            )

    def _validate_layer_top_k(self, m: int):
        per_layer, count = self.layer_num_experts_per_tok, self.num_hidden_layers
        if per_layer is None:
            return
        if len(per_layer) != count:
            raise ValueError(
                f"layer_num_experts_per_tok has {len(per_layer)} entries for {count} layers (num_hidden_layers); "
                f"give one k per layer, or None for num_experts_per_tok ({self.num_experts_per_tok}) everywhere."
            )
        outside = sorted({k for k in per_layer if not 1 <= k <= m})
        if outside:
            raise ValueError(
                f"layer_num_experts_per_tok holds {outside}, outside 1..{m} (the experts per KV group, "
                f"num_attention_heads // num_key_value_heads). Set every entry in [1, {m}]."
            )
        uneven = sorted({k for k in per_layer if m % k})
        if self.expert_routing == "partitioned" and uneven:
            raise ValueError(
                f"expert_routing='partitioned' splits the {m} experts of a group into k equal blocks, but "
                f"layer_num_experts_per_tok holds {uneven}, which do not divide {m}. Use divisors of {m} or "
                f"expert_routing='ranked'."
            )

    def num_experts_per_tok_of(self, layer_idx: int) -> int:
        """k of layer `layer_idx`: its entry of `layer_num_experts_per_tok`, else `num_experts_per_tok`."""
        if self.layer_num_experts_per_tok is None:
            return self.num_experts_per_tok
        return self.layer_num_experts_per_tok[layer_idx]

    def active_query_heads_of(self, layer_idx: int) -> int:
        """Query-attention computations per token in layer `layer_idx`: `dense_num_attention_heads` in a dense
        layer, else G*k routed heads plus the shared head for "gqe"."""
        if self.is_dense_attention_layer(layer_idx):
            return self.dense_num_attention_heads
        return self._active_query_heads(self.num_experts_per_tok_of(layer_idx))

    def is_dense_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has plain GQA attention (`dense_attention_layers`) rather than routed experts."""
        return layer_idx in self.dense_attention_layers

    @property
    def num_experts_per_group(self) -> int:
        """M: query-head experts in each KV group."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_output_slots(self) -> int:
        """S: head-sized slots concatenated before `o_proj` (G*k hard slots, plus weighted and shared for "gqe"), in
        a routed layer with k = `num_experts_per_tok` (`num_output_slots_of` for a layer's own k)."""
        return self._num_output_slots(self.num_experts_per_tok)

    def num_output_slots_of(self, layer_idx: int) -> int:
        """S of routed layer `layer_idx`, at its own k."""
        return self._num_output_slots(self.num_experts_per_tok_of(layer_idx))

    def _num_output_slots(self, k: int) -> int:
        hard_slots = self.num_key_value_heads * k
        return hard_slots + 2 if self.gqe_variant == "gqe" else hard_slots

    @property
    def active_query_heads(self) -> int:
        """Query-attention computations per token in a routed layer with k = `num_experts_per_tok`: G*k routed heads
        plus the shared head for "gqe" (`active_query_heads_of` for a given layer)."""
        return self._active_query_heads(self.num_experts_per_tok)

    def _active_query_heads(self, k: int) -> int:
        return self.num_key_value_heads * k + (1 if self.gqe_variant == "gqe" else 0)


__all__ = ["GQEConfig"]
