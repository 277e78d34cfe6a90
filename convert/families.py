"""The source families the converter reads, in one table.

Everything the converter needs to know about a family of GQA checkpoints is one `SourceFamily` entry: which
`model_type`s it covers, whether its attention projections carry biases, its sliding window, what it cannot
carry, and how its weights map onto Llama's names. The rest of the converter only ever sees the Llama layout
(`model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, norms, embeddings, `lm_head`), so adding
a family is one entry here and one test (tests/test_upcycle.py builds a tiny checkpoint of each family).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import UpcycleError


def _no_window(config) -> int | None:
    return None


def _nothing_unsupported(config) -> str | None:
    return None


def _same_names(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return dict(state_dict)


@dataclass(frozen=True)
class SourceFamily:
    model_types: tuple[str, ...]
    examples: str
    # Do q/k/v (and o, where the family has one) carry biases? GQE has one `attention_bias` flag for all of them.
    attention_bias: Callable[[object], bool]
    # Sliding-window size applied on every layer, or None for full attention.
    sliding_window: Callable[[object], int | None] = _no_window
    # Why a checkpoint of this family cannot be converted, or None.
    unsupported: Callable[[object], str | None] = _nothing_unsupported
    # The source's state dict under Llama's names (split fused projections, rename).
    to_llama_names: Callable[[dict[str, torch.Tensor], object], dict[str, torch.Tensor]] = _same_names


# ------------------------------------------------------------------------------------------------ per family


def _mlp_bias_unsupported(config) -> str | None:
    if getattr(config, "mlp_bias", False):
        return "it sets mlp_bias, which the converter carries for llama sources only"
    return None


def _qwen2_window(config) -> int | None:
    return config.sliding_window if getattr(config, "use_sliding_window", False) else None


def _qwen2_unsupported(config) -> str | None:
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) and {"sliding_attention", "full_attention"} <= set(layer_types):
        return ("it mixes sliding-window and full-attention layers (Qwen2 use_sliding_window with max_window_layers), "
                "and GQE has one attention type for all layers")
    return None


def _phi3_unsupported(config) -> str | None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "linear", "dynamic"):
        return f"its RoPE type {rope.get('rope_type')!r} (Phi-3 long-context scaling) is not carried by GQE"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"it rotates only part of each head (partial_rotary_factor {rope['partial_rotary_factor']})"
    return None


def _phi3_to_llama_names(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Phi-3 fuses q/k/v into `qkv_proj` (rows: H query heads, then G keys, then G values) and gate/up into
    `gate_up_proj` (rows: gate, then up)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    renamed = {}
    for name, tensor in state_dict.items():
        if name.endswith(".self_attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            renamed.update({f"{prefix}q_proj.weight": q, f"{prefix}k_proj.weight": k, f"{prefix}v_proj.weight": v})
        elif name.endswith(".mlp.gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2, dim=0)
            renamed.update({f"{prefix}gate_proj.weight": gate, f"{prefix}up_proj.weight": up})
        else:
            renamed[name] = tensor
    return renamed


FAMILIES = (
    SourceFamily(
        model_types=("llama",), examples="Llama 2/3, SmolLM",
        attention_bias=lambda config: bool(getattr(config, "attention_bias", False)),
    ),
    SourceFamily(
        model_types=("mistral",), examples="Mistral",
        attention_bias=lambda config: False,
        sliding_window=lambda config: getattr(config, "sliding_window", None),
        unsupported=_mlp_bias_unsupported,
    ),
    SourceFamily(
        model_types=("qwen2",), examples="Qwen2, Qwen2.5",
        attention_bias=lambda config: True,  # q/k/v always have biases (o_proj has none: GQE's starts at zero)
        sliding_window=_qwen2_window,
        unsupported=lambda config: _mlp_bias_unsupported(config) or _qwen2_unsupported(config),
    ),
    SourceFamily(
        model_types=("phi3",), examples="Phi-3 (fused qkv_proj and gate_up_proj)",
        attention_bias=lambda config: False,
        sliding_window=lambda config: getattr(config, "sliding_window", None),
        unsupported=lambda config: _mlp_bias_unsupported(config) or _phi3_unsupported(config),
        to_llama_names=_phi3_to_llama_names,
    ),
)


def supported_model_types() -> list[str]:
    return [model_type for family in FAMILIES for model_type in family.model_types]


def family_of(config) -> SourceFamily:
    """The family entry of a source config; refuses architectures the converter cannot carry, naming why."""
    model_type = getattr(config, "model_type", None)
    family = next((family for family in FAMILIES if model_type in family.model_types), None)
    if family is None:
        names = ", ".join(f"{f.model_types[0]} ({f.examples})" for f in FAMILIES)
        raise UpcycleError(
            f"unsupported source model_type {model_type!r}: gqe-upcycle converts {names} checkpoints. "
            "Other architectures differ in attention or layout; adding one is an entry in convert/families.py."
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if heads % kv_heads != 0:
        raise UpcycleError(
            f"the source's num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})."
        )
    reason = family.unsupported(config)
    if reason:
        raise UpcycleError(f"this {model_type} checkpoint cannot be converted: {reason}.")
    return family


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
