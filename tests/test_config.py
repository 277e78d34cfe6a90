"""GQEConfig: defaults reproduce the paper's main layer; bad settings raise ValueError naming field and fix."""

import pytest

from modeling_gqe import GQEConfig


def test_defaults_are_the_papers_main_layer():
    config = GQEConfig()
    assert config.model_type == "gqe"
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (1024, 16, 8, 64)
    assert (config.num_experts_per_tok, config.gqe_variant, config.expert_routing) == (1, "gqe", "ranked")
    assert config.router_aux_loss_coef == 0.01 and config.output_router_logits is False
    assert config.num_experts_per_group == 2
    assert config.active_query_heads == 9  # 9 of 16 query-attention computations per token
    assert config.num_output_slots == 10


def test_round_trip_through_dict():
    config = GQEConfig(num_hidden_layers=2, num_experts_per_tok=2, expert_routing="partitioned", gqe_variant="hard_concat")
    again = GQEConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert "num_experts_per_group" not in config.to_dict()  # derived, never serialised


@pytest.mark.parametrize(
    "overrides,field,fix",
    [
        (dict(num_attention_heads=12, num_key_value_heads=8, head_dim=64), "num_key_value_heads", "divisor of 12"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok", "[1, 2]"),
        (dict(num_experts_per_tok=3), "num_experts_per_tok", "[1, 2]"),
        (dict(num_attention_heads=24, num_key_value_heads=4, head_dim=64, num_experts_per_tok=4,
              expert_routing="partitioned"), "partitioned", "divisor of 6"),
        (dict(gqe_variant="moh"), "gqe_variant", "hard_concat"),
        (dict(expert_routing="random"), "expert_routing", "partitioned"),
        (dict(head_dim=63), "head_dim", "even"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef", ">= 0"),
        (dict(hidden_size=1000, num_attention_heads=16), "hidden_size", "head_dim"),
    ],
)
def test_invalid_settings_raise_value_error_naming_field_and_fix(overrides, field, fix):
    with pytest.raises(ValueError) as error:
        GQEConfig(**overrides)
    assert field in str(error.value) and fix in str(error.value)


def test_valid_edge_settings():
    assert GQEConfig(num_experts_per_tok=2).num_output_slots == 18
    assert GQEConfig(num_attention_heads=24, num_key_value_heads=4, head_dim=64, num_experts_per_tok=3,
                     expert_routing="partitioned").num_experts_per_group == 6
    assert GQEConfig(gqe_variant="hard_concat").active_query_heads == 8
