"""The data path (convert/data.py): files and saved datasets through `datasets`, mixing by weight, streaming, and
clear errors for bad data, checked against blocks cut by hand."""

import json

import pytest
import torch

from conftest import char_tokenizer
from convert.data import TextSource, blocks_of, load_token_blocks
from convert.errors import UpcycleError


ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(ALPHABET)


def rows(letter: str, count: int) -> list[str]:
    return [f"{letter * 5} row {i}." for i in range(count)]


def by_hand(tokenizer, texts: list[str], seq_len: int, separator: str = "\n\n") -> torch.Tensor:
    """Reference: every row's text plus the separator, tokenised and concatenated, cut into blocks."""
    ids = [token for text in texts for token in tokenizer(text + separator, add_special_tokens=False).input_ids]
    return blocks_of(ids, seq_len)


def test_plain_text_is_cut_at_90_percent_of_its_characters(tokenizer, tmp_path, shakespeare_text):
    text = shakespeare_text[:20_000].lower()
    path = tmp_path / "play.txt"
    path.write_text(text)
    splits = load_token_blocks([path], tokenizer, seq_len=64, tokens=6400, held_out_tokens=640)
    cut = int(len(text) * 0.9)
    expected_fit = blocks_of(tokenizer(text[:cut], add_special_tokens=False).input_ids, 64, max_tokens=6400)
    expected_held_out = blocks_of(tokenizer(text[cut:], add_special_tokens=False).input_ids, 64, max_tokens=640)
    assert torch.equal(splits.fit, expected_fit) and splits.fit.shape == (100, 64)
    assert torch.equal(splits.held_out, expected_held_out) and splits.held_out.shape == (10, 64)


def test_jsonl_parquet_and_saved_dataset_give_the_same_blocks(tokenizer, tmp_path):
    import datasets

    texts = rows("a", 50)
    dataset = datasets.Dataset.from_dict({"body": texts, "id": list(range(50))})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = by_hand(tokenizer, texts[:45], 32)  # the last 10% of rows are held out
    for source in ("data.jsonl", "data.parquet", "saved", "saved_dict"):
        splits = load_token_blocks([f"{tmp_path / source},column=body"], tokenizer, 32, tokens=32 * 8)
        assert torch.equal(splits.fit, expected[:8]), source
    with_option = load_token_blocks([tmp_path / "data.jsonl"], tokenizer, 32, 32 * 8, text_column="body")
    assert torch.equal(with_option.fit, expected[:8])


def test_sources_are_mixed_by_weight(tokenizer, tmp_path):
    for letter in "ab":
        (tmp_path / f"{letter}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows(letter, 200)))
    splits = load_token_blocks([f"{tmp_path / 'a.jsonl'},weight=3", f"{tmp_path / 'b.jsonl'}"], tokenizer, 16,
                               tokens=16 * 40, held_out_tokens=16 * 8)
    a_id = tokenizer.convert_tokens_to_ids("a")
    has_a = (splits.fit == a_id).any(-1)
    assert splits.fit.shape == (40, 16) and has_a[:30].all() and not has_a[30:].any()  # 30 blocks of a, 10 of b
    assert torch.equal(splits.fit[:30], by_hand(tokenizer, rows("a", 200)[:180], 16)[:30])
    assert (splits.held_out == a_id).any(-1).sum() == 6  # held out in the same proportions


def test_streaming_holds_out_the_first_blocks_and_fits_on_the_next(tokenizer, tmp_path):
    texts = rows("c", 120)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = by_hand(tokenizer, texts, 16)
    splits = load_token_blocks([tmp_path / "c.jsonl"], tokenizer, 16, tokens=16 * 10, held_out_tokens=16 * 4,
                               streaming=True)
    assert torch.equal(splits.held_out, expected[:4]) and torch.equal(splits.fit, expected[4:14])
    (tmp_path / "c.txt").write_text("".join(text + "\n" for text in texts))  # streamed text comes line by line
    streamed_text = load_token_blocks([tmp_path / "c.txt"], tokenizer, 16, tokens=16 * 10, streaming=True)
    assert torch.equal(streamed_text.fit, by_hand(tokenizer, texts, 16, separator="\n")[:10])


def test_bad_data_gets_a_clear_error(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "body.jsonl").write_text(json.dumps({"body": "abc"}) + "\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        ("missing.txt", "does not exist"),
        ("body.jsonl", "has no column 'text' (its columns: body)"),
        ("empty.jsonl", "empty"),
        ("empty.txt", "is empty"),
        ("short.txt", "fewer than"),
        ("broken.parquet", "cannot read data source"),
        ("notes.docx", "cannot tell the format"),
        ("folder", "not one written by `Dataset.save_to_disk`"),
        ("short.txt,weight=-1", "must be > 0"),
        ("short.txt,colour=red", "options are weight=W, column=NAME and split=NAME"),
    ]
    for spec, message in cases:
        with pytest.raises(UpcycleError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_token_blocks([str(tmp_path / spec)], tokenizer, 16, tokens=16 * 4)


def test_source_specs_parse():
    source = TextSource.parse("/data/wiki.parquet,weight=2.5,column=body,split=test")
    assert source == TextSource("/data/wiki.parquet", 2.5, "body", "test")
    assert TextSource.parse("notes.txt", column="content") == TextSource("notes.txt", 1.0, "content", None)
