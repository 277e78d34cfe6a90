"""The model on a CUDA GPU: in float32 every attention backend gives the CPU's logits and cached decoding gives the
full forward's; in half precision a padded batch stays finite through forward, backward and generate.

Skipped without a GPU (`bash bench/gpu_checks.sh` runs these on one); `GQE_TEST_DEVICE=cpu` runs the same checks
on the CPU.
"""

import copy
import importlib.util
import os

import pytest
import torch
from transformers import DynamicCache

from conftest import SETTING_IDS, SETTINGS, setting_model


DEVICE = torch.device(os.environ.get("GQE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bash bench/gpu_checks.sh runs these on one)")
# On the CPU, torch's compiled flex_attention runs inference only and (torch 2.13) fails to compile a padded cached
# decode, for transformers' Llama as for GQE; the main suite tests flex on the CPU where it works.
FLOAT32_BACKENDS = ["eager", "sdpa"] + (["flex_attention"] if DEVICE.type == "cuda" else [])
# The tiny test models have head_dim 8; Triton's flex_attention kernel needs at least 16 (torch 2.11 on an H200:
# "NYI: embedding dimension of the query, key, and value must be at least 16"), for Llama as for GQE.
HEAD_DIM = 16
# FlashAttention runs in half precision only, and only where its package is installed.
HALF_BACKENDS = FLOAT32_BACKENDS + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def padded_batch(device=torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 12 tokens: one unpadded, one with 5 left pads, one with a single real token (11 pads), so
    some query rows see no key at all."""
    input_ids = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    attention_mask[2, :11] = 0
    return input_ids.to(device), attention_mask.to(device)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_float32_on_the_device_gives_the_cpus_logits_and_caches_them(setting, backend):
    reference = setting_model(setting, attn_implementation="eager", head_dim=HEAD_DIM)
    model = copy.deepcopy(reference).to(DEVICE)
    model.set_attn_implementation(backend)
    input_ids, attention_mask = padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits
        full = model(input_ids.to(DEVICE), attention_mask=attention_mask.to(DEVICE)).logits.cpu()
        torch.testing.assert_close(full[real], expected[real], atol=1e-4, rtol=1e-4)

        # A prefill of 7 tokens, then one token at a time, with the padding mask growing as generate passes it.
        ids, mask = padded_batch(DEVICE)
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, :7], attention_mask=mask[:, :7], past_key_values=cache).logits]
        for t in range(7, 12):
            pieces.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits)
        stepwise = torch.cat(pieces, dim=1).cpu()
    torch.testing.assert_close(stepwise[real], full[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", HALF_BACKENDS)
@pytest.mark.parametrize("setting", [("gqe", "ranked", 1), ("gqe", "ranked", 2), ("weighted_concat", "partitioned", 2)],
                         ids=["gqe-k1", "gqe-k2", "weighted_concat-partitioned-k2"])
def test_half_precision_with_padding_stays_finite(setting, backend, dtype):
    model = setting_model(setting, attn_implementation=backend, head_dim=HEAD_DIM).to(DEVICE, dtype)
    input_ids, attention_mask = padded_batch(DEVICE)
    model.train()
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100),
                output_router_logits=True)
    assert torch.isfinite(out.logits[attention_mask.bool()]).all() and torch.isfinite(out.loss)
    assert out.router_logits[0].dtype == torch.float32  # the router runs in fp32 whatever the model's dtype
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)
    assert generated.shape == (3, 16)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="transformers' offloaded cache streams layers back to a CUDA device")
@pytest.mark.parametrize("setting", [("gqe", "ranked", 1), ("gqe", "partitioned", 2), ("hard_concat", "ranked", 2)],
                         ids=["gqe-k1", "gqe-partitioned-k2", "hard_concat-k2"])
def test_offloaded_cache_generates_the_dynamic_caches_tokens(setting):
    """`cache_implementation="offloaded"` keeps every layer's keys and values (the shared head's among them) on the
    CPU but the one in use; generation with it gives the tokens of the ordinary dynamic cache, which the tests
    above check against the full forward."""
    model = setting_model(setting, head_dim=HEAD_DIM, eos_token_id=None).to(DEVICE)
    input_ids, attention_mask = padded_batch(DEVICE)
    with torch.no_grad():
        dynamic = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
        offloaded = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                                   cache_implementation="offloaded")
    assert dynamic.shape == (3, 20)
    assert torch.equal(offloaded, dynamic)
