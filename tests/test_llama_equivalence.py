"""With partitioned routing, k = M and "hard_concat", GQE is exactly the GQA model (SPEC); so are the layers listed
in `dense_attention_layers`."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_gqe import GQEConfig, GQEForCausalLM
from modeling_gqe.modeling_gqe import GQEAttention, GQEDenseAttention


EXACT_ROUTING = dict(num_experts_per_tok=4, expert_routing="partitioned", gqe_variant="hard_concat")


def llama_and_gqe(attention_bias: bool, tie: bool, **gqe_fields):
    """A random Llama (3 layers, 8 query heads on 2 KV heads) and a GQE model holding its weights: by default every
    layer routed with k = M = 4, partitioned, "hard_concat" (exactly GQA); `gqe_fields` change that."""
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, attention_bias=attention_bias, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    llama = LlamaForCausalLM(llama_config).eval()
    if attention_bias:
        with torch.no_grad():
            for name, param in llama.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
    shape = {key: llama_config.to_dict()[key] for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "attention_bias", "tie_word_embeddings", "rope_parameters", "rms_norm_eps")}
    gqe_config = GQEConfig(**{**shape, **EXACT_ROUTING, **gqe_fields})
    gqe = GQEForCausalLM(gqe_config).eval()
    missing, unexpected = gqe.load_state_dict(llama.state_dict(), strict=False)
    assert unexpected == []
    routed = [i for i in range(3) if i not in gqe_config.dense_attention_layers]
    assert sorted(missing) == sorted(f"model.layers.{i}.self_attn.router.weight" for i in routed)
    with torch.no_grad():  # any router gives the same result: each block holds a single expert
        for index in routed:
            gqe.model.layers[index].self_attn.router.weight.normal_()
    return llama, gqe


def assert_same_outputs_as_llama(llama, gqe, backend):
    """Logits on a padded batch, every recorded hidden state and attention map, and greedy generation."""
    llama.set_attn_implementation(backend)
    gqe.set_attn_implementation(backend)
    input_ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    recorded = {"output_hidden_states": True, "output_attentions": backend == "eager"}  # sdpa returns no weights
    with torch.no_grad():
        expected = llama(input_ids, attention_mask=attention_mask, **recorded)
        actual = gqe(input_ids, attention_mask=attention_mask, **recorded)
    keep = attention_mask.bool()
    torch.testing.assert_close(actual.logits[keep], expected.logits[keep], atol=1e-5, rtol=1e-5)
    # The recorded outputs too: the embeddings and every layer's output, and each head's attention probabilities.
    assert len(actual.hidden_states) == len(expected.hidden_states) == 4
    for gqe_states, llama_states in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(gqe_states[keep], llama_states[keep], atol=1e-5, rtol=1e-5)
    if backend == "eager":
        assert len(actual.attentions) == len(expected.attentions) == 3
        for gqe_weights, llama_weights in zip(actual.attentions, expected.attentions):
            assert gqe_weights.shape == llama_weights.shape == (2, 8, 12, 12)
            torch.testing.assert_close(gqe_weights[0], llama_weights[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gqe_weights[1, :, 4:, 4:], llama_weights[1, :, 4:, 4:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(
            llama.generate(input_ids[:1], max_new_tokens=8, do_sample=False),
            gqe.generate(input_ids[:1], max_new_tokens=8, do_sample=False),
        )


@pytest.mark.parametrize("attention_bias,tie", [(False, False), (True, True)])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_gqe_equals_llama_at_k_equals_m(attention_bias, tie, backend):
    llama, gqe = llama_and_gqe(attention_bias, tie)
    assert_same_outputs_as_llama(llama, gqe, backend)


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_every_layer_in_dense_attention_layers_is_llama(attention_bias, backend):
    """All layers dense (`dense_attention_layers`): no router anywhere, every Llama weight has its place, and the
    outputs are Llama's. The dense layers' head count is their own (8), not the experts' (4 here)."""
    llama, gqe = llama_and_gqe(attention_bias, tie=False, num_attention_heads=4, head_dim=8, num_experts_per_tok=2,
                               dense_num_attention_heads=8, dense_attention_layers=[0, 1, 2])
    assert all(isinstance(layer.self_attn, GQEDenseAttention) for layer in gqe.model.layers)
    assert_same_outputs_as_llama(llama, gqe, backend)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_a_dense_layer_between_exact_routed_layers_is_llama(backend):
    """Layer 1 dense, layers 0 and 2 routed with k = M (exactly GQA, SPEC): the whole model is Llama's, and only the
    routed layers record router logits."""
    llama, gqe = llama_and_gqe(attention_bias=False, tie=False, dense_attention_layers=[1])
    assert [type(layer.self_attn) for layer in gqe.model.layers] == [GQEAttention, GQEDenseAttention, GQEAttention]
    assert_same_outputs_as_llama(llama, gqe, backend)
    with torch.no_grad():
        out = gqe(torch.arange(3, 15)[None], output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (12, 8)
    assert torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("task", ["SequenceClassification", "TokenClassification", "QuestionAnswering"])
def test_task_heads_equal_llamas_at_k_equals_m(task):
    """Each task head on the exact GQE equals Llama's with the same weights: outputs on a padded batch and loss."""
    import transformers

    import modeling_gqe

    llama, gqe = llama_and_gqe(attention_bias=False, tie=False)
    task_fields = {"num_labels": 3, "pad_token_id": 0}
    llama_head = getattr(transformers, f"LlamaFor{task}")(type(llama.config)(**{**llama.config.to_dict(), **task_fields}))
    gqe_head = getattr(modeling_gqe, f"GQEFor{task}")(type(gqe.config)(**{**gqe.config.to_dict(), **task_fields}))
    llama_head.eval()
    gqe_head.eval()
    # The decoders of the two equivalent causal LMs; the task layer random, the same in both.
    # (Llama's QA head keeps its decoder under "transformer", for old checkpoints; GQE's is under "model".)
    llama_head.get_submodule(llama_head.base_model_prefix).load_state_dict(llama.model.state_dict())
    gqe_head.model.load_state_dict(gqe.model.state_dict())
    task_layer = "qa_outputs" if task == "QuestionAnswering" else "score"
    with torch.no_grad():
        for param in getattr(llama_head, task_layer).parameters():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    getattr(gqe_head, task_layer).load_state_dict(getattr(llama_head, task_layer).state_dict())

    input_ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    input_ids[1, 6:] = 0  # right padding: sequence classification pools at the last real token
    attention_mask = (input_ids != 0).long()
    token_labels = torch.randint(0, 3, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = {
        "SequenceClassification": {"labels": torch.tensor([0, 2])},
        "TokenClassification": {"labels": token_labels.masked_fill(attention_mask == 0, -100)},
        "QuestionAnswering": {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([4, 5])},
    }[task]
    with torch.no_grad():
        expected = llama_head(input_ids, attention_mask=attention_mask, **labels)
        actual = gqe_head(input_ids, attention_mask=attention_mask, **labels)
    if task == "SequenceClassification":
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    else:
        real = attention_mask.bool()  # per-token outputs: compared where the tokens are real
        for name in ("start_logits", "end_logits") if task == "QuestionAnswering" else ("logits",):
            torch.testing.assert_close(getattr(actual, name)[real], getattr(expected, name)[real], atol=1e-5, rtol=1e-5)
    assert expected.loss > 0
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
