"""`bench/sample_source_text.py`: text sampled from a source model, reproducible from its seed."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import char_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sample_source_text  # noqa: E402


def sample(path, monkeypatch, *options):
    monkeypatch.setattr(sys, "argv", ["sample_source_text.py", str(path), "--sequences", "3", "--length", "12",
                                      "--batch-size", "2", *options])
    sample_source_text.main()
    return path.read_text()


def test_smollm2_samples_are_reproducible_and_as_long_as_asked(tmp_path, monkeypatch):
    from convert.resources import SMOLLM2_GGUF, smollm2_folder
    from convert.sources import read_source_tokenizer

    first = sample(tmp_path / "a.txt", monkeypatch)
    assert sample(tmp_path / "b.txt", monkeypatch) == first  # same seed, same text
    tokenizer = read_source_tokenizer(str(smollm2_folder()), SMOLLM2_GGUF)
    assert not any(token in first for token in tokenizer.all_special_tokens)
    # 3 sequences of 1 + 12 sampled tokens, never stopped early (the text itself may hold blank lines, so the
    # sequences are counted by their tokens); decoding and re-tokenising may merge or split a few.
    assert 30 <= len(tokenizer(first, add_special_tokens=False).input_ids) <= 48


def test_any_source_folder_with_its_tokenizer(tmp_path, monkeypatch, capsys):
    """--source: a tiny Llama whose embedding is padded past its character tokenizer (as Qwen2's is) starts every
    sequence from one of the tokenizer's ids, never a special one; a folder without a tokenizer is refused by name."""
    tokenizer = char_tokenizer("abcdefghij klmnop")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "bare")
    with pytest.raises(SystemExit):
        sample(tmp_path / "none.txt", monkeypatch, "--source", str(tmp_path / "bare"))
    assert "has no tokenizer" in capsys.readouterr().err and not (tmp_path / "none.txt").exists()

    LlamaForCausalLM(config).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    prompts = []
    generate = LlamaForCausalLM.generate

    def recording_generate(self, input_ids, **kwargs):
        prompts.append(input_ids)
        return generate(self, input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    first = sample(tmp_path / "a.txt", monkeypatch, "--source", str(tmp_path / "source"))
    assert sample(tmp_path / "b.txt", monkeypatch, "--source", str(tmp_path / "source")) == first
    first_tokens = torch.cat(prompts).flatten()
    assert first_tokens.numel() == 6  # 3 sequences per run, one first token each
    assert ((first_tokens >= 1) & (first_tokens < len(tokenizer))).all()  # id 0 is [UNK], the special token
