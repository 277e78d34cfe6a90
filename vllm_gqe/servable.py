"""What the vLLM class can serve, checked from the config alone (no vLLM import), so that vLLM refuses a
checkpoint when it builds its config, in the process that called `LLM(...)` or started the server, with an
error naming the field."""


class GQEUnsupportedConfig(ValueError):
    """A GQE config field vLLM cannot serve; the message names the field."""


def check_tensor_parallel_size(num_key_value_heads: int, tensor_parallel_size: int) -> None:
    if tensor_parallel_size < 1 or num_key_value_heads % tensor_parallel_size:
        raise GQEUnsupportedConfig(
            f"num_key_value_heads={num_key_value_heads} is not divisible by tensor_parallel_size="
            f"{tensor_parallel_size}: GQE shards whole KV groups; choose a tensor_parallel_size that divides it."
        )


def check_servable(config, tensor_parallel_size: int) -> None:
    """Refuse, naming the field, what the vLLM class cannot serve."""
    if config.hidden_act != "silu":
        raise GQEUnsupportedConfig(f"hidden_act={config.hidden_act!r}: vLLM's Llama MLP serves 'silu' only.")
    if config.gqe_variant not in ("gqe", "hard_concat", "weighted_concat"):
        raise GQEUnsupportedConfig(f"gqe_variant={config.gqe_variant!r} is not a GQE variant.")
    if config.expert_routing not in ("ranked", "partitioned"):
        raise GQEUnsupportedConfig(f"expert_routing={config.expert_routing!r} is not a GQE routing.")
    check_tensor_parallel_size(config.num_key_value_heads, tensor_parallel_size)


class GQEConfigCheck:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), called while `VllmConfig` is built."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_servable(vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
