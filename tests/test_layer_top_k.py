"""A k per layer (`layer_num_experts_per_tok`): each routed layer attends its own G*k selected heads (against the naive
per-head reference), caches and generation, saving, the load-balancing loss per layer, bad settings."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_cached_decoding_equals_full_forward, tiny_config, tiny_model
from modeling_gqe import GQEForCausalLM, load_balancing_loss_func, routed_layers_top_k, routing_statistics
from test_attention_reference import naive_gqe_attention

LAYER_TOP_K = [1, 2, 4, 2]  # layer 3 is dense in `model_with_layer_top_k`: its entry is not used


def model_with_layer_top_k(backend="sdpa", **overrides) -> GQEForCausalLM:
    """Four layers, M = 4 experts per group in 2 groups: k = 1, 2, 4 in the routed layers 0-2, layer 3 dense."""
    settings = dict(num_hidden_layers=4, num_experts_per_tok=2, layer_num_experts_per_tok=LAYER_TOP_K,
                    dense_attention_layers=[3])
    return tiny_model(seed=5, attn_implementation=backend, **{**settings, **overrides})


def capture_attention_io(model, input_ids, attention_mask=None) -> dict:
    """Input hidden states and output of every routed layer's attention, by layer index."""
    captured, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        if model.config.is_dense_attention_layer(index):
            continue

        def hook(module, args, kwargs, output, index=index):
            captured[index] = (kwargs["hidden_states"].detach(), output[0].detach())

        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("variant,routing", [("gqe", "ranked"), ("gqe", "partitioned"), ("hard_concat", "ranked"),
                                             ("weighted_concat", "partitioned")])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_each_layer_matches_the_naive_reference_with_its_own_k(variant, routing, backend):
    model = model_with_layer_top_k(backend, gqe_variant=variant, expert_routing=routing)
    input_ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    captured = capture_attention_io(model, input_ids, attention_mask)
    assert sorted(captured) == [0, 1, 2]
    for index, (hidden, output) in captured.items():
        attn = model.model.layers[index].self_attn
        assert attn.top_k == LAYER_TOP_K[index]
        for row in range(2):
            keep = attention_mask[row].bool()
            expected = naive_gqe_attention(attn, hidden[row], keep)
            torch.testing.assert_close(output[row][keep].double(), expected[keep], atol=1e-4, rtol=1e-4)


def test_attended_heads_and_output_slots_follow_each_layers_k():
    """Eager attention returns one probability row per attended head: G*k + the shared head in each routed layer
    (never all M experts), and o_proj reads (G*k + 2) head-sized slots."""
    model = model_with_layer_top_k("eager")
    input_ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
    G, d = 2, 8
    assert [weights.shape[1] for weights in attentions] == [G * 1 + 1, G * 2 + 1, G * 4 + 1, 8]
    widths = [layer.self_attn.o_proj.in_features for layer in model.model.layers]
    assert widths == [(G * 1 + 2) * d, (G * 2 + 2) * d, (G * 4 + 2) * d, 8 * d]
    config = model.config
    assert [config.active_query_heads_of(index) for index in range(4)] == [3, 5, 9, 8]
    assert routed_layers_top_k(config) == [1, 2, 4]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(backend):
    model = model_with_layer_top_k(backend, eos_token_id=None)
    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = assert_cached_decoding_equals_full_forward(model, input_ids, early_static_heads=2)
    assert [layer.keys.shape[1] for layer in cache.layers] == [3, 3, 3, 2]  # G + 1 in routed layers, whatever k


def test_save_load_and_trust_remote_code(tmp_path):
    model = model_with_layer_top_k()
    input_ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(3))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.layer_num_experts_per_tok == LAYER_TOP_K
    with torch.no_grad():
        expected = model(input_ids).logits
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=0, rtol=0)
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "modeling_gqe" not in sys.modules
        data = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["input_ids"]).logits, data["expected"], atol=0, rtol=0)
        print("remote-code-ok", [layer.self_attn.o_proj.in_features for layer in model.model.layers])
        """)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code-ok [32, 48, 80, 64]" in result.stdout


def switch_loss_of_one_layer(logits: torch.Tensor, G: int, k: int, routing: str) -> torch.Tensor:
    """The per-group Switch loss of one layer written out: M * sum_m f[g, m] P[g, m], mean over groups."""
    probs = logits.float().view(logits.shape[0], G, -1).softmax(-1)  # [N, G, M]
    M = probs.shape[-1]
    if routing == "ranked":
        chosen = probs.topk(k, dim=-1).indices
    else:
        width = M // k
        chosen = torch.stack([probs[..., j * width : (j + 1) * width].argmax(-1) + j * width for j in range(k)], -1)
    fraction = torch.zeros_like(probs).scatter_(-1, chosen, 1.0).mean(0)  # [G, M]
    return (M * (fraction * probs.mean(0)).sum(-1)).mean()


@pytest.mark.parametrize("routing", ["ranked", "partitioned"])
def test_load_balancing_loss_sums_each_layers_own_k(routing):
    model = model_with_layer_top_k(expert_routing=routing)
    model.train()
    input_ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == 3  # the dense layer has no router
    expected = sum(switch_loss_of_one_layer(logits, 2, k, routing)
                   for logits, k in zip(out.router_logits, [1, 2, 4]))
    torch.testing.assert_close(out.aux_loss, expected)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + model.config.router_aux_loss_coef * expected)

    statistics = routing_statistics(out.router_logits, 2, [1, 2, 4], routing)
    assert [picks.shape for picks in statistics["selected_experts"]] == [(20, 2, 1), (20, 2, 2), (20, 2, 4)]
    torch.testing.assert_close(statistics["selected_fraction"].sum(-1),
                               torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]))
    with pytest.raises(ValueError, match="lists 2 values for 3 layers"):
        load_balancing_loss_func(out.router_logits, 2, [1, 2], routing)


def test_equal_k_everywhere_is_the_plain_model():
    """`layer_num_experts_per_tok` with one k in every layer is the model with that `num_experts_per_tok`."""
    plain = tiny_model(seed=6, num_experts_per_tok=2)
    listed = GQEForCausalLM(tiny_config(num_experts_per_tok=1, layer_num_experts_per_tok=[2, 2])).eval()
    listed.load_state_dict(plain.state_dict())
    input_ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(listed(input_ids).logits, plain(input_ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("fields,message", [
    ({"layer_num_experts_per_tok": [1]}, r"has 1 entries for 2 layers"),
    ({"layer_num_experts_per_tok": [1, 5]}, r"holds \[5\], outside 1..4"),
    ({"layer_num_experts_per_tok": [0, 1]}, r"holds \[0\], outside 1..4"),
    ({"layer_num_experts_per_tok": [3, 1], "expert_routing": "partitioned"}, r"holds \[3\], which do not divide 4"),
])
def test_bad_layer_top_k_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_layer_k_defaults_to_num_experts_per_tok_and_ranked_routing_takes_any_k():
    assert tiny_config(layer_num_experts_per_tok=[3, 1]).num_experts_per_tok_of(0) == 3
    assert tiny_config(num_experts_per_tok=2).num_experts_per_tok_of(1) == 2
