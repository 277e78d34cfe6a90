"""The packed GQE attention equals a naive per-token, per-group, per-expert computation of the paper's layer."""

import copy
import itertools

import pytest
import torch
from transformers import DynamicCache

from conftest import skip_unless_llama_can, tiny_model


def rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Llama rotary embedding of one head vector x [d] at an integer position (rotate-half convention)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = position * inv_freq
    cos, sin = torch.cat([angles.cos(), angles.cos()]), torch.cat([angles.sin(), angles.sin()])
    rotated = torch.cat([-x[d // 2 :], x[: d // 2]])
    return x * cos + rotated * sin


def attend(query: torch.Tensor, keys: list, values: list, scale: float, record: list | None = None) -> torch.Tensor:
    scores = torch.stack([query @ key for key in keys]) * scale
    probs = torch.softmax(scores, dim=0)
    if record is not None:
        record.append(probs)
    return sum(p * v for p, v in zip(probs, values))


def naive_gqe_attention(attn, hidden: torch.Tensor, keep: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """hidden [T, D] of one sequence, keep [T] bool (False for padding). Returns [T, D] for kept rows.
    If `weights` is a dict, weights[t] gets token t's attention probabilities over the visible tokens, one row
    per attended head: the selected experts group by group in slot order, then the shared head."""
    config = attn.config
    G, M, d = config.num_key_value_heads, config.num_experts_per_group, config.head_dim
    k = config.num_experts_per_tok_of(attn.layer_idx)  # the layer's own k (`layer_num_experts_per_tok`)
    theta = config.rope_parameters["rope_theta"]
    h = hidden.double()

    def linear(module, x):
        out = x @ module.weight.double().T
        return out + module.bias.double() if module.bias is not None else out

    q_all = linear(attn.q_proj, h).view(-1, G * M, d)
    k_all = linear(attn.k_proj, h).view(-1, G, d)
    v_all = linear(attn.v_proj, h).view(-1, G, d)
    logits = h @ attn.router.weight.double().T  # [T, G*M]
    T = h.shape[0]
    keys = [[rope(k_all[s, g], s, theta) for g in range(G)] for s in range(T)]
    outputs = torch.zeros(T, config.hidden_size, dtype=torch.float64)
    for t in range(T):
        if not keep[t]:
            continue
        visible = [s for s in range(t + 1) if keep[s]]
        hard_slots, picks, probabilities = [], [], []
        for g in range(G):
            probs = torch.softmax(logits[t, g * M : (g + 1) * M], dim=0)
            if config.expert_routing == "ranked":
                chosen = sorted(range(M), key=lambda m: -probs[m].item())[:k]
            else:  # partitioned: slot j = best expert of block j
                block = M // k
                chosen = [max(range(j * block, (j + 1) * block), key=lambda m: probs[m].item()) for j in range(k)]
            for m in chosen:
                query = rope(q_all[t, g * M + m], t, theta)
                out = attend(
                    query, [keys[s][g] for s in visible], [v_all[s, g] for s in visible], d**-0.5, probabilities
                )
                picks.append((probs[m], out))
                hard_slots.append(out * probs[m] if config.gqe_variant == "weighted_concat" else out)
        slots = hard_slots
        if config.gqe_variant == "gqe":
            total = sum(p for p, _ in picks)
            weighted = sum((p / total) * out for p, out in picks)
            shared_query = rope(linear(attn.q_shared, h[t]), t, theta)
            mean_keys = [torch.stack(keys[s]).mean(0) for s in visible]
            mean_values = [v_all[s].mean(0) for s in visible]
            shared = attend(shared_query, mean_keys, mean_values, d**-0.5, probabilities)
            slots = hard_slots + [weighted, shared]
        outputs[t] = linear(attn.o_proj, torch.cat(slots))
        if weights is not None:
            weights[t] = torch.stack(probabilities)
    return outputs


def capture_attention_io(model, input_ids, attention_mask):
    """Run the model and return (input, output) of the first layer's attention module."""
    captured = {}
    attn = model.model.layers[0].self_attn

    def hook(module, args, kwargs, output):
        captured["hidden"] = kwargs["hidden_states"].detach()
        captured["output"] = output[0].detach()

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    handle.remove()
    return captured["hidden"], captured["output"]


CASES = list(
    itertools.product(
        ["gqe", "hard_concat", "weighted_concat"], ["ranked", "partitioned"], ["eager", "sdpa", "flex_attention"],
        [False, True],
    )
)


@pytest.mark.parametrize("variant,routing,backend,padded", CASES)
def test_packed_layer_matches_naive_reference(variant, routing, backend, padded):
    if backend == "flex_attention":
        skip_unless_llama_can("flex_attention")
    model = tiny_model(
        seed=3, attn_implementation=backend, gqe_variant=variant, expert_routing=routing, num_experts_per_tok=2,
        attention_bias=True,
    )
    with torch.no_grad():  # non-zero biases so the bias paths are exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    batch, seq_len = 2, 9
    input_ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        attention_mask[0, :3] = 0  # left padding
        attention_mask[1, -2:] = 0  # right padding
    hidden, output = capture_attention_io(model, input_ids, attention_mask)
    attn = model.model.layers[0].self_attn
    for row in range(batch):
        keep = attention_mask[row].bool()
        expected = naive_gqe_attention(attn, hidden[row], keep)
        torch.testing.assert_close(output[row][keep].double(), expected[keep], atol=1e-5, rtol=1e-5)


def test_reference_detects_a_wrong_selection():
    """Sanity check of the reference: routing the other way round must give a different output."""
    model = tiny_model(seed=3, attn_implementation="eager", num_experts_per_tok=1)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    hidden, output = capture_attention_io(model, input_ids, torch.ones_like(input_ids))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.router.weight.neg_()
    expected = naive_gqe_attention(attn, hidden[0], torch.ones(6, dtype=torch.bool))
    assert (output[0].double() - expected).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("variant,k", [("gqe", 1), ("gqe", 2), ("hard_concat", 1)])
def test_unselected_experts_are_never_attended(backend, variant, k, monkeypatch):
    """The backend receives exactly G*k routed query heads, plus the shared head: with k = 1 in the same call
    (G + 1 query heads on G + 1 KV heads, the last KV head being the mean over groups), with k > 1 in a call of
    its own on that mean head."""
    if backend == "flex_attention":
        skip_unless_llama_can("flex_attention")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(attn_implementation=backend, num_experts_per_tok=k, gqe_variant=variant)
    config = model.config
    seen = []
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def spy_interface(name, default):
        function = original(name, default)

        def spy(module, query, key, value, *args, **kwargs):
            seen.append((query.shape[1], key.shape[1], module.num_key_value_groups))
            return function(module, query, key, value, *args, **kwargs)

        return spy

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", spy_interface)
    with torch.no_grad():
        model(torch.randint(3, 90, (1, 5)))
    G = config.num_key_value_heads
    if variant != "gqe":
        expected_calls = [(G * k, G, k)]
    elif k == 1:
        expected_calls = [(G + 1, G + 1, 1)]
    else:
        expected_calls = [(G * k, G, k), (1, 1, 1)]
    assert seen == expected_calls * config.num_hidden_layers
    total_query_heads = sum(q for q, _, _ in seen) / config.num_hidden_layers
    assert total_query_heads == config.active_query_heads < config.num_attention_heads


@pytest.mark.parametrize("routing,k", [("ranked", 1), ("partitioned", 2), ("ranked", 3)])
def test_a_decoded_token_multiplies_only_its_selected_experts_query_rows(routing, k):
    """One token (B*T*k < M): the query projection reads only the selected experts' rows of q_proj. Filling every
    other row with NaN leaves the step's logits finite and equal to those of the dense projection."""
    model = tiny_model(num_experts_per_tok=k, expert_routing=routing, attention_bias=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.bias"):
                param.normal_(0, 0.1)
    config = model.config
    G, M, d = config.num_key_value_heads, config.num_experts_per_group, config.head_dim
    prompt, token = torch.randint(3, 90, (1, 6)), torch.randint(3, 90, (1, 1))
    picks = {}
    hooks = [
        layer.self_attn.router.register_forward_hook(lambda mod, args, out, i=i: picks.__setitem__(i, out[2]))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        expected = model(torch.cat([prompt, token], dim=1)).logits[:, -1]  # dense projection for every token
        cache = DynamicCache(config=model.config)
        model(prompt, past_key_values=cache)
        snapshot = {i: layer.self_attn.q_proj.weight.clone() for i, layer in enumerate(model.model.layers)}
        model(token, past_key_values=copy.deepcopy(cache))  # learn this step's picks
        for i, layer in enumerate(model.model.layers):
            selected = (picks[i][0, 0] + torch.arange(G)[:, None] * M).reshape(-1)
            unselected = torch.ones(G * M, dtype=torch.bool)
            unselected[selected] = False
            layer.self_attn.q_proj.weight.view(G * M, d, -1)[unselected] = float("nan")
        actual = model(token, past_key_values=cache).logits[:, -1]
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.copy_(snapshot[i])
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,k", [("gqe", 1), ("gqe", 2), ("hard_concat", 2)])
def test_output_attentions_are_each_attended_heads_probabilities(variant, k):
    """`output_attentions=True` (eager) returns one row per attended head, [B, G*k (+1 shared), T, S], equal to the
    naive layer's probabilities; a cached decoding step returns the same heads' last row (with k > 1 the shared
    query is repeated inside that call, and the repeats are not returned)."""
    model = tiny_model(seed=3, attn_implementation="eager", gqe_variant=variant, num_experts_per_tok=k)
    config = model.config
    heads = config.num_key_value_heads * k + (variant == "gqe")
    seq_len = 7
    input_ids = torch.randint(3, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(4))
    hidden, _ = capture_attention_io(model, input_ids, torch.ones_like(input_ids))
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions
    assert len(attentions) == config.num_hidden_layers
    assert all(layer.shape == (1, heads, seq_len, seq_len) for layer in attentions)

    expected = {}
    naive_gqe_attention(model.model.layers[0].self_attn, hidden[0], torch.ones(seq_len, dtype=torch.bool), expected)
    for t in range(seq_len):
        torch.testing.assert_close(attentions[0][0, :, t, : t + 1].double(), expected[t], atol=1e-5, rtol=1e-5)
        assert attentions[0][0, :, t, t + 1 :].abs().sum() == 0  # nothing of the future

    with torch.no_grad():
        cache = DynamicCache(config=config)
        model(input_ids[:, :-1], past_key_values=cache)
        step = model(input_ids[:, -1:], past_key_values=cache, output_attentions=True).attentions
    for full, decoded in zip(attentions, step):
        assert decoded.shape == (1, heads, 1, seq_len)
        torch.testing.assert_close(decoded, full[:, :, -1:], atol=1e-5, rtol=1e-5)
