"""The Hugging Face ecosystem around a GQE model: PEFT LoRA, the text-generation pipeline, torch.compile, big-model
loading with a device map, continuous batching, ExecuTorch export and torchao quantization."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GenerationConfig, Trainer, TrainingArguments, pipeline

from conftest import byte_blocks, char_tokenizer, setting_model, skip_unless_llama_can, tiny_model
from modeling_gqe import GQEForCausalLM
from modeling_gqe.modeling_gqe import PAGED_CACHE_TAKES_INDICES, PagedAttentionCache
from test_llama_equivalence import llama_and_gqe


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("lora_on_router", [False, True])
def test_peft_lora_trains_saves_reloads_and_merges_to_identical_logits(lora_on_router, shakespeare_text, tmp_path):
    tiny_model(vocab_size=256).save_pretrained(tmp_path / "base")
    base = GQEForCausalLM.from_pretrained(tmp_path / "base")
    lora = LoraConfig(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        # The router is a bare weight (as in Mixtral), so LoRA reaches it as a parameter.
        target_parameters=["router.weight"] if lora_on_router else None,
    )
    model = get_peft_model(base, lora)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("router.lora_B" in name for name in trainable) == lora_on_router

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=byte_blocks(shakespeare_text, 64, 80)).train()

    input_ids = torch.tensor([list(b"ROMEO: But soft, what light")])
    model.eval()
    trained = logits_of(model, input_ids)
    untouched = logits_of(GQEForCausalLM.from_pretrained(tmp_path / "base").eval(), input_ids)
    assert (trained - untouched).abs().max() > 1e-2  # the adapter learned something
    router_b = [p for name, p in model.named_parameters() if "router.lora_B" in name]
    assert all(p.abs().sum() > 0 for p in router_b)  # and the router's adapter too, when asked

    model.save_pretrained(tmp_path / "adapter")
    fresh_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), trained, atol=1e-6, rtol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is GQEForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, input_ids), trained, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(
        logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), input_ids), trained, atol=1e-5, rtol=0
    )


def test_text_generation_pipeline_matches_generate(shakespeare_text, tmp_path):
    tokenizer = char_tokenizer(shakespeare_text[:50_000])
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=None, bos_token_id=None, eos_token_id=None)
    prompt = "First Citizen:\nBefore we proceed"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    expected_text = tokenizer.decode(expected[0])
    assert expected_text.startswith(prompt)

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"] == expected_text

    # From a folder, the way users call it: the pipeline resolves "gqe" through the Auto classes.
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    assert type(generator.model) is GQEForCausalLM
    assert generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"] == expected_text


COMPILED_SETTINGS = [("gqe", "ranked", 1), ("gqe", "partitioned", 2), ("weighted_concat", "ranked", 2)]
COMPILED_IDS = ["gqe-ranked-k1", "gqe-partitioned-k2", "weighted_concat-ranked-k2"]


def test_device_map_with_a_layer_offloaded_to_disk_gives_the_same_logits_and_tokens(tmp_path):
    """accelerate's big-model loading: whole decoder layers placed (`_no_split_modules`), one of them on disk and
    streamed in for its forward, the shared head's cached K/V included."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "checkpoint")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint", device_map=device_map,
                                                     offload_folder=tmp_path / "offload").eval()
    assert offloaded.hf_device_map["model.layers.1"] == "disk"
    input_ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(offloaded, input_ids), logits_of(model, input_ids), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert torch.equal(offloaded.generate(input_ids[:1], max_new_tokens=6, do_sample=False),
                           model.generate(input_ids[:1], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("setting", COMPILED_SETTINGS, ids=COMPILED_IDS)
def test_torch_compile_fullgraph_forward_gives_the_same_logits(setting):
    skip_unless_llama_can("compile_fullgraph")
    model = setting_model(setting)
    input_ids = torch.randint(3, 97, (2, 12))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding goes through the compiled mask path too
    compiled = torch.compile(model, fullgraph=True)  # the class claims _can_compile_fullgraph
    with torch.no_grad():
        for _ in range(2):  # a second input reuses the compiled graph
            expected = model(input_ids, attention_mask=mask).logits
            torch.testing.assert_close(compiled(input_ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
            input_ids = torch.randint(3, 97, (2, 12))


def test_torch_compile_fullgraph_training_step_gives_the_eager_loss_and_gradients():
    """What `TrainingArguments(torch_compile=True)` runs: the compiled forward and its backward, with labels (so the
    load-balancing loss too) and left padding, for the "gqe" variant with k = 2 (the routed gather, the weighted
    slot and the shared head all get gradients)."""
    skip_unless_llama_can("compile_fullgraph")
    model = setting_model(("gqe", "partitioned", 2)).train()
    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    labels = input_ids.masked_fill(mask == 0, -100)

    def loss_and_gradients(forward):
        loss = forward(input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        gradients = {name: param.grad.clone() for name, param in model.named_parameters()}
        model.zero_grad()
        return loss.detach(), gradients

    eager_loss, eager_gradients = loss_and_gradients(model)
    assert all(gradient.abs().sum() > 0 for gradient in eager_gradients.values())  # every weight learns
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):  # the second step reuses the compiled graphs
        loss, gradients = loss_and_gradients(compiled)
        torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
        for name, gradient in eager_gradients.items():
            torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("setting", COMPILED_SETTINGS[:2], ids=COMPILED_IDS[:2])
def test_static_cache_generation_with_a_compiled_forward(setting):
    """generate(cache_implementation="static") with `model.forward` compiled (fullgraph): the same tokens as eager
    generation, through a compiled prefill and compiled one-token decode steps."""
    skip_unless_llama_can("compile_fullgraph")
    model = setting_model(setting, eos_token_id=None)
    input_ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model.generate(input_ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
        model.forward = torch.compile(model.forward, fullgraph=True)
        compiled = model.generate(input_ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert compiled.shape == (2, 17) and torch.equal(compiled, eager)


@pytest.mark.parametrize("setting", COMPILED_SETTINGS, ids=COMPILED_IDS)
def test_continuous_batching_generates_each_prompts_own_greedy_tokens(setting):
    """`generate_batch`, transformers' continuous batching (what `transformers serve` runs): the prompts are packed
    into one sequence and their KV goes to a paged cache that transformers sizes from `config.num_key_value_heads`,
    so the "gqe" variant's shared head reads the mean of the cached groups. Each prompt gets the tokens of its own
    `generate`."""
    model = setting_model(setting, eos_token_id=None)
    prompts = [torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(length)).tolist()
               for length in (5, 11, 3)]
    with torch.no_grad():
        # First: transformers 5.5's generate_batch leaves the model set to its paged attention afterwards.
        expected = [model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
                    for prompt in prompts]
        batched = model.generate_batch(
            inputs=prompts,
            generation_config=GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0),
        )
    assert len(batched) == 3
    assert [batched[request_id].generated_tokens for request_id in sorted(batched)] == expected


@pytest.mark.parametrize("setting", COMPILED_SETTINGS, ids=COMPILED_IDS)
def test_executorch_export_decodes_like_a_full_forward(setting):
    """transformers' ExecuTorch recipe: `torch.export` of one decode step with a static cache, sized from
    `config.num_key_value_heads` (the G groups' heads; the shared head reads their mean). Fed the tokens one at a
    time, the exported program gives the full forward's logits at every position."""
    skip_unless_llama_can("export")
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = setting_model(setting)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                               cache_config={"batch_size": 1, "max_cache_len": 16})
    input_ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    exported = TorchExportableModuleForDecoderOnlyLM(model).export(input_ids=input_ids[:, :1])
    key_caches = [buffer for name, buffer in exported.named_buffers() if "key_cache" in name]
    assert len(key_caches) == 2 and key_caches[0].shape == (1, model.config.num_key_value_heads, 16, 8)
    decode_step = exported.module()
    with torch.no_grad():
        full = model(input_ids).logits[0]
        for position in range(12):
            logits = decode_step(input_ids=input_ids[:, position : position + 1],
                                 cache_position=torch.tensor([position]))
            torch.testing.assert_close(logits[0, -1], full[position], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(PAGED_CACHE_TAKES_INDICES, reason="transformers < 5.19's paged cache has no block-table read")
def test_continuous_batching_through_a_block_table_refuses_the_shared_head_and_names_the_fix():
    """With flash attention, continuous batching reads the paged cache through a block table: the cache's update
    hands back this step's keys and values only (the kernel reads the rest itself), so the "gqe" variant's shared
    head, the mean of the cached groups, cannot be formed. It refuses, naming sdpa; the other variants carry on."""

    class BlockTableRead(PagedAttentionCache):
        def __init__(self):  # no pages: a block-table read returns the step's own keys and values
            pass

        def update(self, key_states, value_states, layer_idx, kwargs):
            return key_states, value_states

    for variant in ("gqe", "hard_concat"):
        model = setting_model((variant, "ranked", 1))
        hidden_states = torch.randn(1, 4, model.config.hidden_size)
        position_embeddings = model.model.rotary_emb(hidden_states, torch.arange(4).unsqueeze(0))
        attention = model.model.layers[0].self_attn
        call = dict(cache=BlockTableRead(), block_table=torch.zeros(1, 1, 1, dtype=torch.int32))
        if variant == "gqe":
            with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
                attention(hidden_states, position_embeddings, None, **call)
        else:  # no attention mask: the eager/sdpa fallbacks attend over the step's own keys, causally
            output, _ = attention(hidden_states, position_embeddings, None, **call)
            assert output.shape == hidden_states.shape


def torchao_int8(scheme: str):
    """transformers' torchao quantization config: int8 weights, with float or dynamically int8-quantized inputs."""
    quantization = pytest.importorskip("torchao.quantization")
    from transformers import TorchAoConfig

    schemes = {"int8_weights": quantization.Int8WeightOnlyConfig,
               "int8_weights_and_inputs": quantization.Int8DynamicActivationInt8WeightConfig}
    return TorchAoConfig(schemes[scheme]())


@pytest.mark.parametrize("scheme", ["int8_weights", "int8_weights_and_inputs"])
def test_torchao_quantized_exact_conversion_equals_the_quantized_llama(scheme, tmp_path):
    """An exact conversion (k = M, each expert its source head) quantized with torchao gives the quantized Llama's
    logits: per-output-row int8 scales survive duplicating query rows into experts and appending zero o_proj slots."""
    llama, gqe = llama_and_gqe(attention_bias=False, tie=False)
    llama.save_pretrained(tmp_path / "llama")
    gqe.save_pretrained(tmp_path / "gqe")
    quantized_llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=torchao_int8(scheme))
    quantized_gqe = AutoModelForCausalLM.from_pretrained(tmp_path / "gqe", quantization_config=torchao_int8(scheme))
    assert type(quantized_gqe) is GQEForCausalLM and quantized_gqe.is_quantized
    input_ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits_of(quantized_llama.eval(), input_ids)
    assert (expected - logits_of(llama, input_ids)).abs().max() > 1e-3  # quantization did change the numbers
    torch.testing.assert_close(logits_of(quantized_gqe.eval(), input_ids), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(quantized_gqe.generate(input_ids, max_new_tokens=8, do_sample=False),
                           quantized_llama.generate(input_ids, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("setting", COMPILED_SETTINGS, ids=COMPILED_IDS)
def test_torchao_int8_weights_compute_with_the_dequantized_weights_and_keep_the_router_in_full_precision(
    setting, tmp_path
):
    """A routed model quantized to int8 weights computes what the float model computes with each projection's
    dequantized weights; the router, a bare weight rather than an nn.Linear, is not quantized (a rounded router could
    pick other experts). The quantized checkpoint saves and reloads."""
    model = setting_model(setting)
    model.save_pretrained(tmp_path / "float")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=torchao_int8("int8_weights"))
    quantized.eval()
    float_state = model.state_dict()
    dequantized_state = {}
    for name, param in quantized.named_parameters():
        if name.endswith("router.weight"):
            assert type(param) is torch.nn.Parameter and param.dtype == torch.float32
            assert torch.equal(param, float_state[name])
        elif name.endswith("proj.weight") or name.endswith("q_shared.weight"):
            assert type(param) is not torch.nn.Parameter, f"{name} was not quantized"
        dequantized_state[name] = param.dequantize() if type(param) is not torch.nn.Parameter else param.detach()
    reference = setting_model(setting)
    reference.load_state_dict(dequantized_state)

    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    with torch.no_grad():
        actual = quantized(input_ids, attention_mask=mask).logits
        expected = reference(input_ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(actual[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert (actual[keep] - logits_of(model, input_ids)[keep]).abs().max() > 1e-4  # not the float model's logits

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    assert type(reloaded.model.layers[0].self_attn.q_proj.weight) is type(quantized.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids, attention_mask=mask).logits[keep], actual[keep], atol=0, rtol=0)
        assert torch.equal(reloaded.generate(input_ids[:1], max_new_tokens=8, do_sample=False),
                           reference.generate(input_ids[:1], max_new_tokens=8, do_sample=False))


def test_the_tools_load_a_torchao_quantized_checkpoint_as_it_is(tmp_path):
    """gqe-eval's loader (`load_checkpoint`) takes a quantized folder of either kind, source or GQE, without undoing
    the quantization: it drops the quantized flag only from a GGUF's model, whose weights are dequantised floats."""
    from convert.sources import load_checkpoint

    input_ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    for name, model in zip(("llama", "gqe"), llama_and_gqe(attention_bias=False, tie=False)):
        model.save_pretrained(tmp_path / name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp_path / name, quantization_config=torchao_int8("int8_weights"))
        quantized.save_pretrained(tmp_path / f"{name}-int8")
        loaded, tokenizer = load_checkpoint(str(tmp_path / f"{name}-int8"))
        assert tokenizer is None and loaded.is_quantized and type(loaded) is type(quantized)
        weight = loaded.model.layers[0].mlp.up_proj.weight
        assert type(weight) is type(quantized.model.layers[0].mlp.up_proj.weight) is not torch.nn.Parameter
        torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(quantized.eval(), input_ids), atol=0, rtol=0)
