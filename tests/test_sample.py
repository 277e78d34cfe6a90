"""`gqe-sample-text` (convert/sample.py): text sampled from a source model, reproducible from its seed, written whole
or not at all."""

import subprocess

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import char_tokenizer
from convert import sample, staging
from convert.errors import UpcycleError
from convert.sample import write_sampled_text

SMALL = ["--sequences", "3", "--length", "12", "--batch-size", "2"]


def test_smollm2_samples_are_reproducible_and_as_long_as_asked(smollm2_source, smollm2_dense_folder, tmp_path):
    from convert.resources import SMOLLM2_GGUF, smollm2_folder

    assert sample.main([str(smollm2_folder()), str(tmp_path / "a.txt"), "--gguf-file", SMOLLM2_GGUF, *SMALL]) == 0
    # The same seed again, from the GGUF's dequantised folder (the same weights and tokenizer): the same text.
    assert sample.main([str(smollm2_dense_folder), str(tmp_path / "b.txt"), *SMALL]) == 0
    first = (tmp_path / "a.txt").read_text()
    assert (tmp_path / "b.txt").read_text() == first
    tokenizer = smollm2_source[1]
    assert not any(token in first for token in tokenizer.all_special_tokens)
    # 3 sequences of 1 + 12 sampled tokens, never stopped early (the text itself may hold blank lines, so the
    # sequences are counted by their tokens); decoding and re-tokenising may merge or split a few.
    assert 30 <= len(tokenizer(first, add_special_tokens=False).input_ids) <= 48


@pytest.fixture
def tiny_source(tmp_path):
    """A tiny Llama whose embedding is padded past its character tokenizer (as Qwen2's is), with its tokenizer."""
    tokenizer = char_tokenizer("abcdefghij klmnop")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source", tokenizer


def test_first_tokens_come_from_the_tokenizer_never_special(tiny_source, tmp_path, monkeypatch):
    source, tokenizer = tiny_source
    prompts = []
    generate = LlamaForCausalLM.generate

    def recording_generate(self, input_ids, **kwargs):
        prompts.append(input_ids)
        return generate(self, input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    assert sample.main([str(source), str(tmp_path / "a.txt"), *SMALL]) == 0
    assert sample.main([str(source), str(tmp_path / "b.txt"), *SMALL]) == 0
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert sample.main([str(source), str(tmp_path / "c.txt"), *SMALL, "--seed", "1"]) == 0
    assert (tmp_path / "c.txt").read_text() != (tmp_path / "a.txt").read_text()
    first_tokens = torch.cat(prompts).flatten()
    assert first_tokens.numel() == 9  # 3 sequences per run, one first token each
    assert ((first_tokens >= 1) & (first_tokens < len(tokenizer))).all()  # id 0 is [UNK], the special token
    # Every sequence is its prompt plus exactly --length sampled characters, joined by blank lines.
    assert all(len(prompt[0]) == 1 for prompt in prompts)
    assert len((tmp_path / "a.txt").read_text()) <= 3 * 13 + 2 * 2


def test_a_tiny_top_p_samples_the_most_likely_token(tiny_source, tmp_path, monkeypatch):
    """Nucleus sampling keeps the fewest tokens whose probability reaches top_p, at least one: a tiny top_p leaves
    only the most likely, so the text is greedy decoding's from the same first tokens."""
    source, tokenizer = tiny_source
    prompts = []
    generate = LlamaForCausalLM.generate

    def recording_generate(self, input_ids, **kwargs):
        prompts.append((self, input_ids))
        return generate(self, input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    assert sample.main([str(source), str(tmp_path / "nucleus.txt"), *SMALL, "--top-p", "1e-6"]) == 0
    assert sample.main([str(source), str(tmp_path / "full.txt"), *SMALL]) == 0
    greedy = []
    for model, prompt in prompts[:2]:  # the --top-p run's two batches
        with torch.no_grad():
            tokens = generate(model, prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, eos_token_id=None, pad_token_id=0)
        greedy += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert (tmp_path / "nucleus.txt").read_text() == "\n\n".join(greedy)
    assert (tmp_path / "full.txt").read_text() != (tmp_path / "nucleus.txt").read_text()  # same seed, same first tokens


def test_bad_requests_are_refused_before_any_model_work(tiny_source, tmp_path, capsys):
    source, _ = tiny_source
    (tmp_path / "bare").mkdir()
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "bare")
    assert sample.main([str(tmp_path / "bare"), str(tmp_path / "none.txt"), *SMALL]) == 2
    assert "has no tokenizer" in capsys.readouterr().err and not (tmp_path / "none.txt").exists()

    with pytest.raises(UpcycleError, match="--length is 0: it must be at least 1"):
        write_sampled_text(str(source), tmp_path / "x.txt", length=0)
    with pytest.raises(UpcycleError, match="--temperature is 0: it must be above 0"):
        write_sampled_text(str(source), tmp_path / "x.txt", temperature=0)
    with pytest.raises(UpcycleError, match="--top-p is 1.5: it must be above 0 and at most 1"):
        write_sampled_text(str(source), tmp_path / "x.txt", top_p=1.5)
    with pytest.raises(UpcycleError, match="is a folder"):
        write_sampled_text(str(source), tmp_path, sequences=1, length=2)

    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    assert sample.main([str(source), str(existing), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert sample.main([str(source), str(existing), *SMALL, "--force"]) == 0
    assert existing.read_text() != "keep me"
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]


def test_an_interrupted_write_leaves_no_file(tiny_source, tmp_path, monkeypatch):
    source, _ = tiny_source

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_sampled_text(str(source), tmp_path / "out.txt", sequences=2, length=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_console_script_is_installed():
    result = subprocess.run(["gqe-sample-text", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    options = ("--sequences", "--length", "--seed", "--temperature", "--top-p", "--force")
    assert all(option in result.stdout for option in options)
