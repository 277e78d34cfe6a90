"""Cached decoding equals the full forward; generation, padding and causality behave as for a dense model."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from conftest import (
    SETTING_IDS, SETTINGS, setting_model, skip_unless_llama_can, skip_where_llama_gets_it_wrong, tiny_model,
)
from modeling_gqe.modeling_gqe import CACHE_FIELD



def random_ids(batch, length, seed=0, vocab=97):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
def test_token_by_token_and_chunked_decoding_equal_full_forward(setting, backend):
    if backend == "flex_attention":
        skip_unless_llama_can("flex_attention")
        skip_where_llama_gets_it_wrong("flex_attention_decoding")
    model = setting_model(setting, attn_implementation=backend)
    input_ids = random_ids(2, 14)
    with torch.no_grad():
        full = model(input_ids).logits

        cache = DynamicCache(config=model.config)
        stepwise = [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(14)]
        torch.testing.assert_close(torch.cat(stepwise, dim=1), full, atol=1e-5, rtol=1e-5)

        # The cache's name since transformers 5.24 (`cache`) and before it (`past_key_values`, above) both work.
        cache = DynamicCache(config=model.config)
        chunks = [model(input_ids[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 11), (11, 14)]]
        torch.testing.assert_close(torch.cat([chunk.logits for chunk in chunks], dim=1), full, atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == 14
        assert chunks[-1][CACHE_FIELD] is cache  # returned under the installed transformers' field name


@pytest.mark.parametrize("setting", [("gqe", "ranked", 1), ("gqe", "partitioned", 2), ("weighted_concat", "ranked", 3)],
                         ids=["gqe-ranked-k1", "gqe-partitioned-k2", "weighted_concat-ranked-k3"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_sliding_window_decoding_keeps_the_window_and_equals_full_forward(setting, backend):
    """A Mistral-style window (what a converted Mistral carries): the dynamic cache holds sliding-window layers that
    keep only the last `window - 1` positions, the shared head's K/V among them, and decoding far past the window,
    token by token and in chunks longer than it, gives the full forward's logits and greedy tokens. (The windowed
    full forward itself equals Mistral's: tests/test_upcycle.py.)"""
    window, length = 6, 20
    model = setting_model(setting, attn_implementation=backend, sliding_window=window, eos_token_id=None)
    input_ids = random_ids(2, length)
    with torch.no_grad():
        full = model(input_ids).logits
        unwindowed = setting_model(setting, attn_implementation=backend)(input_ids).logits
        assert not torch.allclose(full[:, window:], unwindowed[:, window:], atol=1e-3)  # the window matters
        torch.testing.assert_close(full[:, :window], unwindowed[:, :window])

        cache = DynamicCache(config=model.config)
        stepwise = [model(input_ids[:, t : t + 1], cache=cache).logits for t in range(length)]
        torch.testing.assert_close(torch.cat(stepwise, dim=1), full, atol=1e-5, rtol=1e-5)
        heads = model.config.num_key_value_heads + (model.config.gqe_variant == "gqe")
        assert cache.layers[0].keys.shape == (2, heads, window - 1, model.config.head_dim)

        cache = DynamicCache(config=model.config)
        chunks = [model(input_ids[:, a:b], cache=cache).logits for a, b in [(0, 9), (9, 10), (10, 18), (18, 20)]]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)

        generated = model.generate(input_ids[:, :4], max_new_tokens=12, do_sample=False)
        tokens = input_ids[:, :4]
        for _ in range(12):  # greedy by full forwards, no cache
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("initialised", ["on_first_use", "from_the_config"])
def test_static_cache_decoding_equals_full_forward(setting, initialised):
    """A static cache initialised on first use takes the model's own keys: G + 1 heads for the "gqe" variant (the
    shared head's K/V is head G). One initialised ahead of time from `config.num_key_value_heads`, as transformers'
    ExecuTorch export and chunked prefill do, holds the G groups' heads, and the shared head's K/V is their mean."""
    model = setting_model(setting)
    config = model.config
    input_ids = random_ids(1, 10)
    with torch.no_grad():
        full = model(input_ids).logits
        cache = StaticCache(config=config, max_cache_len=16)
        if initialised == "from_the_config":
            cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads, head_dim=config.head_dim,
                                       dtype=torch.float32, device=torch.device("cpu"))
        prefill = model(input_ids[:, :6], past_key_values=cache, cache_position=torch.arange(6)).logits
        steps = [
            model(input_ids[:, t : t + 1], past_key_values=cache, cache_position=torch.tensor([t])).logits
            for t in range(6, 10)
        ]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    shared_head_cached = config.gqe_variant == "gqe" and initialised == "on_first_use"
    assert cache.layers[0].keys.shape == (1, config.num_key_value_heads + shared_head_cached, 16, config.head_dim)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_generate_same_with_and_without_cache(setting, backend):
    model = setting_model(setting, attn_implementation=backend, eos_token_id=None)  # no early stop: full lengths
    input_ids = random_ids(2, 6)
    with torch.no_grad():
        cached = model.generate(input_ids, max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids, max_new_tokens=12, do_sample=False, use_cache=False)
        static = model.generate(input_ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, static)


@pytest.mark.parametrize("setting", [("gqe", "ranked", 2), ("gqe", "partitioned", 2), ("weighted_concat", "ranked", 1)],
                         ids=["gqe-ranked-k2", "gqe-partitioned-k2", "weighted_concat-ranked-k1"])
def test_assisted_and_prompt_lookup_decoding_equal_plain_greedy(setting):
    """Speculative decoding verifies several tokens in one cached forward and crops the cache (the shared head's
    K/V with it) where a draft is rejected: a different GQE model as the assistant (mostly rejected), the model
    itself (always accepted), and prompt lookup must all give plain greedy decoding's tokens."""
    model, other = setting_model(setting), tiny_model(seed=5)
    lengths = {"max_new_tokens": 12, "min_new_tokens": 12}  # (eos_token_id=None trips prompt lookup on 5.5)
    input_ids = random_ids(1, 7, seed=3)
    input_ids[0, 4:] = input_ids[0, :3]  # a repeat for prompt lookup to draft from
    with torch.no_grad():
        plain = model.generate(input_ids, do_sample=False, **lengths)
        for drafts in ({"assistant_model": other}, {"assistant_model": model}, {"prompt_lookup_num_tokens": 3}):
            drafted = model.generate(input_ids, do_sample=False, **lengths, **drafts)
            # (transformers 5.5's prompt lookup can overrun max_new_tokens by one token here; generate's loop, not
            # the model, decides the length: the tokens are compared up to plain greedy's length.)
            assert drafted.shape[1] >= plain.shape[1] and torch.equal(drafted[:, : plain.shape[1]], plain), drafts


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_sampling_is_reproducible_and_beam_scores_equal_a_full_forward(setting):
    model = setting_model(setting, eos_token_id=None)
    input_ids = random_ids(1, 5)
    with torch.no_grad():
        torch.manual_seed(7)
        first = model.generate(input_ids, max_new_tokens=8, do_sample=True, top_k=20)
        torch.manual_seed(7)
        second = model.generate(input_ids, max_new_tokens=8, do_sample=True, top_k=20)
        # length_penalty 0: a beam's score is the plain sum of its tokens' log-probabilities, which beam search
        # accumulated step by step through the reordered cache.
        beams = model.generate(input_ids, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False,
                               length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(first, second) and first.shape == (1, 13)
    assert beams.sequences.shape == (2, 13)
    for sequence, score in zip(beams.sequences, beams.sequences_scores):
        with torch.no_grad():
            logprobs = model(sequence[None]).logits.log_softmax(-1)[0, 4:-1]
        full_forward = logprobs.gather(-1, sequence[5:, None]).sum()
        torch.testing.assert_close(score, full_forward, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_left_padded_batch_equals_each_row_alone(setting, backend):
    model = setting_model(setting, attn_implementation=backend, eos_token_id=None)
    short, long = random_ids(1, 4, seed=1)[0], random_ids(1, 9, seed=2)[0]
    pad = model.config.pad_token_id
    input_ids = torch.stack([torch.cat([torch.full((5,), pad), short]), long])
    attention_mask = torch.stack([torch.cat([torch.zeros(5), torch.ones(4)]), torch.ones(9)]).long()
    with torch.no_grad():
        batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
        alone_short = model.generate(short[None], max_new_tokens=6, do_sample=False)
        alone_long = model.generate(long[None], max_new_tokens=6, do_sample=False)
        # logits of the real tokens too, with position ids as generate computes them
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        padded_logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        short_logits = model(short[None]).logits
    assert torch.equal(batched[0, 5:], alone_short[0])
    assert torch.equal(batched[1], alone_long[0])
    torch.testing.assert_close(padded_logits[0, 5:], short_logits[0], atol=1e-5, rtol=1e-5)


def test_later_tokens_never_change_earlier_logits():
    model = tiny_model(num_experts_per_tok=2)
    input_ids = random_ids(1, 12)
    changed = input_ids.clone()
    changed[0, 7:] = random_ids(1, 5, seed=9)[0]
    with torch.no_grad():
        a, b = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_logits_to_keep():
    model = tiny_model()
    input_ids = random_ids(2, 8)
    with torch.no_grad():
        full = model(input_ids).logits
        last = model(input_ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["gqe", "hard_concat", "weighted_concat"])
def test_kv_cache_bytes_against_the_same_shape_gqa_model(variant):
    """hard_concat and weighted_concat cache exactly GQA's keys and values. "gqe" caches one more KV head per
    layer, the shared head's mean K/V: (G + 1) / G of GQA's bytes, here 3/2 with G = 2 (the paper's G = 8: 9/8)."""
    model = tiny_model(num_experts_per_tok=1, gqe_variant=variant)
    config = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
        )
    ).eval()
    input_ids = random_ids(2, 11)

    def cache_bytes(cache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    with torch.no_grad():
        gqe_cache = model(input_ids, use_cache=True).past_key_values
        gqa_cache = llama(input_ids, use_cache=True).past_key_values
    G, d, L = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    cached_heads = G + 1 if variant == "gqe" else G
    # layers x (keys, values) x batch x heads x tokens x head_dim x 4 bytes
    assert cache_bytes(gqa_cache) == L * 2 * 2 * G * 11 * d * 4
    assert cache_bytes(gqe_cache) == L * 2 * 2 * cached_heads * 11 * d * 4
    assert [tuple(layer.keys.shape) for layer in gqe_cache.layers] == [(2, cached_heads, 11, d)] * L
    if variant == "gqe":  # the extra head is the mean over groups of the cached keys and values
        keys, values = gqe_cache.layers[0].keys, gqe_cache.layers[0].values
        torch.testing.assert_close(keys[:, G], keys[:, :G].mean(1))
        torch.testing.assert_close(values[:, G], values[:, :G].mean(1))
