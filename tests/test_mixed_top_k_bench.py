"""`bench/bench_mixed_top_k.py`: the k = 2 conversion with one layer's attention from the k = 1 one, against a
layer-by-layer forward written out; its head count against the configs'; its layer choice against the costs."""

import json
import sys
from pathlib import Path

import torch

from conftest import SOURCE_VOCAB as VOCAB

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_mixed_top_k  # noqa: E402
from bench_layer_costs import converted_attention  # noqa: E402


def source_and_conversions():
    """A tiny Llama (6 query heads in 2 KV groups, 3 layers) and its k = 2 and k = 1 conversions, layer 1 dense in
    both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=6, num_key_value_heads=2)).eval()
    fit_ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))
    conversions = []
    for top_k in (2, 1):
        converted = build_sparse_initial(source, top_k, dense_layers=[1])
        calibrate_sparse(source, converted, fit_ids)
        conversions.append(converted.eval())
    return source, *conversions


def layer_by_layer_logits(model, attentions, input_ids):
    """The decoder written out: embeddings, then each layer's norm-attention-residual and norm-MLP-residual with
    `attentions[i]` as layer i's attention, the final norm and the head."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = inner.rotary_emb(hidden, positions)
    causal = torch.full((input_ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    for layer, attention in zip(inner.layers, attentions):
        hidden = hidden + attention(layer.input_layernorm(hidden), position_embeddings=rotary,
                                    attention_mask=causal)[0]
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))


def test_mixed_model_is_the_k2_model_with_the_k1_models_attention_in_the_layers_swapped():
    _, k2, k1 = source_and_conversions()
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    # The converter keeps the source's embeddings, norms and MLPs in both, so only the attention differs.
    assert torch.equal(k2.model.layers[0].mlp.up_proj.weight, k1.model.layers[0].mlp.up_proj.weight)
    with torch.no_grad():
        k2_logits = k2(input_ids).logits
        # the written-out decoder is the model's own forward
        torch.testing.assert_close(layer_by_layer_logits(k2, [layer.self_attn for layer in k2.model.layers], input_ids),
                                   k2_logits, rtol=1e-4, atol=1e-5)
        expected = layer_by_layer_logits(k2, [k1.model.layers[0].self_attn, k2.model.layers[1].self_attn,
                                              k2.model.layers[2].self_attn], input_ids)
        with converted_attention(k2, k1, [0]) as mixed:
            assert bench_mixed_top_k.heads_per_token(mixed) == 3 + 6 + 5  # k = 1 + shared, dense, k = 2 + shared
            mixed_logits = mixed(input_ids).logits
    torch.testing.assert_close(mixed_logits, expected, rtol=1e-4, atol=1e-5)
    assert (mixed_logits - k2_logits).abs().max() > 1e-3  # the swap changed the model
    with torch.no_grad():  # and leaving put k2's own attention back
        torch.testing.assert_close(k2(input_ids).logits, k2_logits, rtol=0, atol=0)
    assert bench_mixed_top_k.heads_per_token(k2) == 5 + 6 + 5
    assert bench_mixed_top_k.routed_layers(k2) == [0, 2]


def test_heads_per_token_counts_what_each_config_says_is_attended():
    _, k2, k1 = source_and_conversions()
    for model in (k2, k1):
        config = model.config
        dense = len(config.dense_attention_layers)
        routed = config.num_hidden_layers - dense
        expected = routed * config.active_query_heads + dense * config.dense_num_attention_heads
        assert bench_mixed_top_k.heads_per_token(model) == expected


def test_cheapest_layers_rank_by_the_donors_extra_cost_averaged_over_shared_texts():
    donor = {"a": [0.5, 0.1, 0.3, 0.2], "b": [0.5, 0.3, 0.1, 0.2], "only donor": [9.0, 0.0, 0.0, 0.0]}
    base = {"a": [0.4, 0.0, 0.0, 0.0], "b": [0.4, 0.0, 0.0, 0.0]}
    # extra cost averaged over a and b: 0.1, 0.2, 0.2, 0.2 (layer 0's is the smallest although its own is the largest)
    assert bench_mixed_top_k.cheapest_layers(donor, base, [0, 1, 2, 3], 1) == [0]
    assert bench_mixed_top_k.cheapest_layers(donor, base, [1, 2, 3], 2) == [1, 2]  # ties keep layer order
    assert bench_mixed_top_k.cheapest_layers(donor, base, [3, 0], 2) == [0, 3]


def test_single_layer_costs_are_each_layers_mean_loss_over_the_sources(tmp_path):
    losses = {"source": {"t": [[2.0, 1], [6.0, 3]]},  # 8 / 4 = 2.0 a token
              "converted": {"t": [[3.0, 1], [9.0, 3]]},
              "layer 1": {"t": [[2.0, 1], [7.0, 3]]},  # 9 / 4: adds 0.25
              "layer 0": {"t": [[4.0, 1], [6.0, 3]]}}  # 10 / 4: adds 0.5
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"losses": losses}))
    assert bench_mixed_top_k.single_layer_costs(str(path)) == {"t": [0.5, 0.25]}
