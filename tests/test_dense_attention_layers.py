"""Layers listed in `dense_attention_layers` (Llama's grouped-query attention; that they equal Llama's is in
tests/test_llama_equivalence.py) mixed with routed ones: caches, generation, saving, training, the routing callback,
bad settings. vLLM serves them with the tokens transformers generates: tests/test_vllm.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_cached_decoding_equals_full_forward, tiny_config, tiny_model
from modeling_gqe import GQEForCausalLM


def mixed_model(backend="sdpa", **overrides) -> GQEForCausalLM:
    """Three layers: 0 and 2 routed ("gqe" variant, k = 2 of M = 4, shared head cached as KV head G), 1 dense with
    6 query heads, a count of its own."""
    return tiny_model(attn_implementation=backend, num_hidden_layers=3, num_experts_per_tok=2,
                      dense_attention_layers=[1], dense_num_attention_heads=6, **overrides)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_mixed_layers_cached_decoding_equals_full_forward(backend):
    model = mixed_model(backend, eos_token_id=None)
    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = assert_cached_decoding_equals_full_forward(model, input_ids, early_static_heads=2)
    # Routed layers cache G + 1 KV heads (the shared head's is the last), the dense layer the G groups' own.
    assert [layer.keys.shape[1] for layer in cache.layers] == [3, 2, 3]
    with torch.no_grad():
        cached = model.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False)
        static = model.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(cached, static)


def test_mixed_layers_save_load_and_train(tmp_path):
    """The layer kinds survive saving (AutoModelForCausalLM, and trust_remote_code), and a training step reaches
    the dense layer's projections and the routed layers' routers."""
    model = mixed_model()
    input_ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "mixed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed").eval()
    assert reloaded.config.dense_attention_layers == [1] and reloaded.config.dense_num_attention_heads == 6
    assert reloaded.model.layers[1].self_attn.q_proj.weight.shape == (6 * 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)

    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].self_attn.router.weight.grad.abs().sum() > 0 and layers[2].self_attn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fields,message", [
    ({"dense_attention_layers": [0, 2]}, r"holds \[2\], outside the model's layers 0..1"),
    ({"dense_attention_layers": [-1]}, r"outside the model's layers"),
    ({"dense_attention_layers": [1, 1]}, "more than once"),
    ({"dense_attention_layers": [0], "dense_num_attention_heads": 5}, r"dense_num_attention_heads \(5\) must be a "
                                                                     r"positive multiple of num_key_value_heads \(2\)"),
])
def test_bad_dense_layer_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_dense_layer_defaults():
    config = tiny_config()
    assert config.dense_attention_layers == [] and config.dense_num_attention_heads == 8
    assert tiny_config(dense_attention_layers=[1, 0]).dense_attention_layers == [0, 1]


def test_routing_callback_names_routed_layers_by_their_index(tmp_path):
    """Trainer's routing figures: one per routed layer, named by the decoder layer (0 and 2), none for the dense 1."""
    from transformers import Trainer, TrainingArguments

    from modeling_gqe import GQERoutingCallback

    model = mixed_model()
    model.train()
    ids = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(2))
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GQERoutingCallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    names = {key for key in logged[-1] if key.startswith("router_entropy/")}
    assert names == {"router_entropy/layer_0", "router_entropy/layer_2"}
