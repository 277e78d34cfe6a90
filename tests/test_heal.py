"""Sparse conversion and healing end to end on a tiny Llama with a character-level tokenizer."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from convert.calibrate import head_dropping_baseline, held_out_perplexity, split_calibration_text
import convert.heal
from convert.heal import DistillationTrainer, distill, heal
from convert.upcycle import upcycle


@pytest.fixture(scope="module")
def char_source(tmp_path_factory):
    """A tiny Llama (6 heads in 2 groups) trained for a few steps on Shakespeare characters, with its tokenizer."""
    from conftest import SHARED_DATA, char_tokenizer

    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:200_000]
    tokenizer = char_tokenizer(text)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
    ))
    ids = torch.tensor(tokenizer(text[:60_000]).input_ids)
    ids = ids[: len(ids) // 64 * 64].view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):  # enough for the heads to matter
        batch = ids[(step * 16) % (len(ids) - 16):][:16]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("char_llama")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text_file = folder / "text.txt"
    text_file.write_text(text)
    return folder, text_file


def test_sparse_conversion_of_a_trained_model_beats_head_dropping(char_source, tmp_path):
    folder, text_file = char_source
    report = upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
                     calibration_tokens=8192, held_out_tokens=4096)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "k1", trust_remote_code=True).eval()
    assert model.config.active_query_heads == 3 and model.config.expert_routing == "partitioned"
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    _, held_out = split_calibration_text(tokenizer, text_file.read_text(), 8192, held_out_tokens=4096)
    dropping = held_out_perplexity(head_dropping_baseline(source, keep_per_group=1), held_out)
    assert report["held-out perplexity (converted)"] < dropping
    assert report["held-out perplexity (source)"] < dropping


def test_distillation_loss_matches_the_kl_formula():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    trainer = DistillationTrainer.__new__(DistillationTrainer)  # only compute_loss is exercised
    trainer.teacher, trainer.alpha, trainer.temperature = teacher.eval(), 0.3, 2.0
    ids = torch.randint(0, 50, (2, 7))
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    s_logits, t_logits = student(ids).logits / 2.0, teacher(ids).logits / 2.0
    kl = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - s_logits.log_softmax(-1))).sum(-1).mean() * 4.0
    expected = 0.3 * kl + 0.7 * student(ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    trainer.teacher = student  # a student equal to its teacher has zero distillation loss
    trainer.alpha = 1.0
    assert trainer.compute_loss(student, {"input_ids": ids, "labels": ids}).abs() < 1e-5


def test_heal_moves_the_sparse_model_towards_the_source(char_source, tmp_path):
    folder, text_file = char_source
    upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
            calibration_tokens=4096, held_out_tokens=4096)
    report = heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "healed"), str(text_file), tokens=16384,
                  seq_len=64, batch_size=16, learning_rate=2e-3, held_out_tokens=4096)
    before = report["held-out perplexity (GQE before healing)"]
    after = report["held-out perplexity (GQE after healing)"]
    source = report["held-out perplexity (source)"]
    assert abs(math.log(after / source)) < abs(math.log(before / source)), report
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", trust_remote_code=True)
    assert healed.config.model_type == "gqe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed", "k1"]  # no staging folder left


def test_heal_leaves_nothing_behind_when_training_fails(char_source, tmp_path, monkeypatch):
    folder, text_file = char_source
    upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
            calibration_tokens=4096, held_out_tokens=4096)

    def interrupted(*args, **kwargs):
        (kwargs.get("output_dir") or args[3]).mkdir(parents=True)  # Trainer scratch exists when it fails
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.heal, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "healed"), str(text_file), tokens=4096, seq_len=64,
             held_out_tokens=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1"]


def test_distill_fine_tunes_a_dense_model_too(char_source, tmp_path):
    """The benchmark's dense control: the source given the healing recipe, with its untouched copy as teacher."""
    folder, text_file = char_source
    teacher = LlamaForCausalLM.from_pretrained(folder).eval()
    student = LlamaForCausalLM.from_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train_ids, _ = split_calibration_text(tokenizer, text_file.read_text(), 16384, seq_len=64, held_out_tokens=4096)
    before = held_out_perplexity(student, train_ids)
    losses = distill(student, teacher, train_ids, tmp_path / "trainer", batch_size=16, learning_rate=2e-3)
    assert len(losses) >= 2 and not student.training
    after = held_out_perplexity(student, train_ids)
    assert after < 0.95 * before, (before, after)
    assert held_out_perplexity(teacher, train_ids) == pytest.approx(before)  # the teacher stays frozen
