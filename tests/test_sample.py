"""`gqe-sample-text` (convert/sample.py): text sampled from a source model, reproducible from its seed, written whole
or not at all."""

import subprocess

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import char_tokenizer
from convert import sample, staging
from convert.errors import UpcycleError
from convert.sample import user_turn_opening, write_sampled_text

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

    # --chat: sampled after SmolLM2-Instruct's system prompt and user marker, neither of which is written.
    opening = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tokenizer.decode(user_turn_opening(tokenizer)) == opening + "<|im_start|>user\n"
    assert sample.main([str(smollm2_folder()), str(tmp_path / "c.txt"), "--gguf-file", SMOLLM2_GGUF, *SMALL,
                        "--chat"]) == 0
    chat = (tmp_path / "c.txt").read_text()
    assert "helpful AI assistant named SmolLM" not in chat and not chat.startswith("user")
    assert 24 <= len(tokenizer(chat, add_special_tokens=False).input_ids) <= 48  # the role markers are not written


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


CHAT_TEMPLATE = "system: be kind\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_chat_samples_start_from_the_opening_of_a_user_turn_and_leave_it_out(tmp_path, monkeypatch):
    """--chat: every sequence is sampled after the template's text before a user's message (here, written out by
    hand: "system: be kind\nuser: "), and the file holds only what was sampled after it."""
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz :\n")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "chat")
    tokenizer.save_pretrained(tmp_path / "chat")
    opening = tokenizer("system: be kind\nuser: ", add_special_tokens=False).input_ids
    assert user_turn_opening(tokenizer) == opening
    calls = []
    generate = LlamaForCausalLM.generate

    def recording_generate(self, input_ids, **kwargs):
        calls.append((input_ids, generate(self, input_ids, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    assert sample.main([str(tmp_path / "chat"), str(tmp_path / "a.txt"), *SMALL, "--chat"]) == 0
    assert [len(prompt) for prompt, _ in calls] == [2, 1]  # 3 sequences in batches of 2
    assert all(row.tolist() == opening for prompt, _ in calls for row in prompt)
    sampled = [tokenizer.decode(row[len(opening):], skip_special_tokens=True) for _, tokens in calls for row in tokens]
    assert all(len(row) == len(opening) + 12 for _, tokens in calls for row in tokens)
    assert (tmp_path / "a.txt").read_text() == "\n\n".join(sampled)
    assert sample.main([str(tmp_path / "chat"), str(tmp_path / "b.txt"), *SMALL, "--chat"]) == 0
    assert (tmp_path / "b.txt").read_text() == (tmp_path / "a.txt").read_text()


def test_chat_sampling_needs_a_chat_template(tiny_source, tmp_path, capsys, monkeypatch):
    source, _ = tiny_source
    monkeypatch.setattr(sample, "read_source_weights", lambda *args: pytest.fail("weights read before the check"))
    assert sample.main([str(source), str(tmp_path / "a.txt"), *SMALL, "--chat"]) == 2
    assert "--chat needs a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()


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
    options = ("--sequences", "--length", "--seed", "--temperature", "--top-p", "--chat", "--force")
    assert all(option in result.stdout for option in options)
