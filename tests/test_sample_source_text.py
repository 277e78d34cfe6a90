"""`bench/sample_source_text.py`: text sampled from the bundled SmolLM2, reproducible from its seed."""

import sys
from pathlib import Path

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
