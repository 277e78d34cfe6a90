"""Sparse conversion and healing end to end on a tiny Llama with a character-level tokenizer."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          TrainerCallback)

import convert.heal
from convert.errors import UpcycleError
from convert.data import load_token_blocks
from convert.evaluate import perplexity
from convert.heal import DistillationTrainer, distill, heal, main as heal_main, place_teacher
from convert.layout import head_dropping_baseline
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
    held_out = load_token_blocks([text_file], tokenizer, 256, 8192, held_out_tokens=4096).held_out
    dropping = perplexity(head_dropping_baseline(source, keep_per_group=1), held_out)
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


def test_the_teacher_follows_the_students_device_and_dtype():
    """On a GPU the Trainer moves the student (and may train it in bf16); the teacher must follow, or its forward
    fails on CPU inputs. Checked on CPU with a bf16 student, and with the meta device standing in for another."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    teacher = LlamaForCausalLM(config).eval()
    student = LlamaForCausalLM(config).to(torch.bfloat16)
    trainer = DistillationTrainer.__new__(DistillationTrainer)  # only compute_loss is exercised
    trainer.teacher, trainer.alpha, trainer.temperature = teacher, 0.5, 1.0
    ids = torch.randint(0, 50, (2, 7))
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16} and torch.isfinite(loss)
    trainer.compute_loss(student.to("meta"), {"input_ids": ids.to("meta"), "labels": ids.to("meta")})
    assert {(p.device.type, p.dtype) for p in trainer.teacher.parameters()} == {("meta", torch.bfloat16)}
    moved = place_teacher(LlamaForCausalLM(config), torch.device("meta"), torch.float16)
    assert {(p.device.type, p.dtype) for p in moved.parameters()} == {("meta", torch.float16)}


@pytest.mark.parametrize("block_layout", ["importance", "least-dropped"])
def test_sparse_k2_conversion_beats_head_dropping_with_either_layout(char_source, tmp_path, block_layout):
    folder, text_file = char_source
    report = upcycle(str(folder), tmp_path / "k2", mode="sparse", top_k=2, calibration_file=str(text_file),
                     calibration_tokens=8192, held_out_tokens=4096, block_layout=block_layout)
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    held_out = load_token_blocks([text_file], tokenizer, 256, 8192, held_out_tokens=4096).held_out
    assert report["held-out perplexity (converted)"] < perplexity(head_dropping_baseline(source, keep_per_group=2),
                                                                 held_out)


def test_refinement_lowers_the_attention_error_and_the_held_out_perplexity(char_source, tmp_path, capsys):
    """gqe-upcycle --refine-epochs: Adam on each converted layer after its closed-form fit. The layer error it reports
    falls, and the converted model reads text neither conversion saw better than the closed form alone."""
    folder, text_file = char_source
    common = dict(mode="sparse", top_k=1, calibration_file=str(text_file), calibration_tokens=8192,
                  held_out_tokens=4096)
    closed_form = upcycle(str(folder), tmp_path / "closed-form", **common)
    capsys.readouterr()
    refined = upcycle(str(folder), tmp_path / "refined", refine_epochs=3, **common)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("refinement:"))
    before, after = map(float, re.search(r"error ([0-9.]+) -> ([0-9.]+) over 2 layers", line).groups())
    assert after < 0.95 * before, line
    assert refined["held-out perplexity (converted)"] < closed_form["held-out perplexity (converted)"]
    assert refined["held-out perplexity (source)"] == closed_form["held-out perplexity (source)"]



def test_refinement_batches_are_its_own(char_source):
    """refine_batch_size splits only the refinement's Adam steps: fitting in batches of 4 and refining in batches
    of 2 gives the weights of doing everything in batches of 2 (the closed forms do not depend on batching), and
    not those of refining in batches of 4."""
    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    folder, text_file = char_source
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    fit_ids = load_token_blocks([text_file], tokenizer, 64, 512).fit  # 8 sequences

    def converted(**batching):
        model = build_sparse_initial(source, 1)
        calibrate_sparse(source, model, fit_ids, refine_epochs=2, **batching)
        return model.state_dict()

    split, all_in_twos, in_fours = (converted(batch_size=4, refine_batch_size=2), converted(batch_size=2),
                                    converted(batch_size=4))
    for name, value in split.items():
        torch.testing.assert_close(value, all_in_twos[name], atol=1e-5, rtol=1e-4, msg=name)
    assert max((value - in_fours[name]).abs().max().item() for name, value in split.items()) > 1e-4

def test_heal_moves_the_sparse_model_towards_the_source(char_source, tmp_path):
    folder, text_file = char_source
    upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
            calibration_tokens=4096, held_out_tokens=4096)
    report = heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "healed"), text_file=str(text_file), tokens=16384,
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
    scratch = []

    def interrupted(student, teacher, train_ids, output_dir, **kwargs):
        scratch.append(Path(output_dir))
        (Path(output_dir) / "checkpoint-1").mkdir()  # Trainer scratch exists when it fails
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.heal, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "healed"), text_file=str(text_file), tokens=4096,
             seq_len=64, held_out_tokens=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1"]
    assert scratch and not scratch[0].exists()


def test_distill_fine_tunes_a_dense_model_too(char_source, tmp_path):
    """The benchmark's dense control: the source given the healing recipe, with its untouched copy as teacher."""
    folder, text_file = char_source
    teacher = LlamaForCausalLM.from_pretrained(folder).eval()
    student = LlamaForCausalLM.from_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train_ids = load_token_blocks([text_file], tokenizer, 64, 16384).fit
    before = perplexity(student, train_ids)
    losses = distill(student, teacher, train_ids, tmp_path / "trainer", batch_size=16, learning_rate=2e-3,
                     alpha=0.5)  # the LM loss half: KL to its own copy alone barely moves it
    assert len(losses) >= 2 and not student.training
    after = perplexity(student, train_ids)
    assert after < 0.95 * before, (before, after)
    assert perplexity(teacher, train_ids) == pytest.approx(before)  # the teacher stays frozen


def test_distill_epochs_pass_over_the_text_again_under_one_schedule(char_source, tmp_path):
    folder, text_file = char_source
    teacher = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train_ids = load_token_blocks([text_file], tokenizer, 64, 16384).fit
    steps_per_pass = math.ceil(train_ids.shape[0] / 16)

    class LearningRates(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            self.seen.append(lr_scheduler.get_last_lr()[0])

    rates = {}
    for epochs in (1, 2):
        rates[epochs] = LearningRates()
        distill(LlamaForCausalLM.from_pretrained(folder), teacher, train_ids, tmp_path / f"trainer{epochs}",
                batch_size=16, learning_rate=1e-3, epochs=epochs, callbacks=[rates[epochs]])
    one, two = rates[1].seen, rates[2].seen
    assert len(one) == steps_per_pass and len(two) == 2 * steps_per_pass
    # One cosine schedule spans both passes: half-way it is near its peak's half, not restarted or finished.
    assert 0.3e-3 < two[steps_per_pass - 1] < 0.7e-3 and two[-1] < 0.05e-3 and one[-1] < 0.05e-3
    with pytest.raises(UpcycleError, match="--epochs 0: healing needs a whole number"):
        distill(LlamaForCausalLM.from_pretrained(folder), teacher, train_ids, tmp_path / "trainer0", epochs=0)


def test_distill_trains_from_its_first_step(char_source, tmp_path):
    """A heal too short for a warm-up still trains: its one step runs at the peak rate, not the warm-up's 0."""
    folder, text_file = char_source
    teacher = LlamaForCausalLM.from_pretrained(folder).eval()
    student = LlamaForCausalLM.from_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    train_ids = load_token_blocks([text_file], tokenizer, 64, 1024).fit[:16]
    before = {name: weight.clone() for name, weight in student.state_dict().items()}
    rates = []

    class LearningRates(TrainerCallback):
        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            rates.append(lr_scheduler.get_last_lr()[0])

    distill(student, teacher, train_ids, tmp_path / "trainer", batch_size=16, learning_rate=1e-3, alpha=0.5,
            callbacks=[LearningRates()])
    assert len(rates) == 1
    moved = max((student.state_dict()[name] - weight).abs().max().item() for name, weight in before.items())
    # Adam's first step moves every weight with a gradient by about the rate itself.
    assert 0.5e-3 < moved < 1.5e-3, moved


def test_heal_of_the_attention_only_leaves_every_other_weight_as_converted(char_source, tmp_path):
    folder, text_file = char_source
    upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
            calibration_tokens=4096, held_out_tokens=4096)
    report = heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "healed"), text_file=str(text_file), tokens=8192,
                  seq_len=64, batch_size=16, learning_rate=2e-3, held_out_tokens=4096, trainable="attention")
    assert report["held-out perplexity (GQE after healing)"] < report["held-out perplexity (GQE before healing)"]
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "k1", trust_remote_code=True).state_dict()
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", trust_remote_code=True).state_dict()
    changed = {name for name in converted if not torch.equal(converted[name], healed[name])}
    attention = {name for name in converted if ".self_attn." in name}
    assert changed and changed <= attention, sorted(changed - attention)
    assert {"model.layers.0.self_attn.router.weight", "model.layers.1.self_attn.o_proj.weight"} <= changed


def test_heal_input_errors_are_one_line(char_source, tmp_path, capsys):
    import shutil

    folder, text_file = char_source
    upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text_file),
            calibration_tokens=4096, held_out_tokens=4096)
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "k1", truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    capsys.readouterr()
    cases = [
        ([truncated, folder, "o1", "--text-file", text_file], "truncated/model.safetensors cannot be read"),
        ([folder, folder, "o2", "--text-file", text_file], "is not a GQE checkpoint (model_type 'llama')"),
        ([tmp_path / "k1", folder, "o3"], "needs training text: --text-file TXT or --data SOURCE"),
        ([tmp_path / "k1", folder, "o4", "--text-file", tmp_path / "missing.txt"], "missing.txt does not exist"),
        ([tmp_path / "k1", tmp_path / "nowhere", "o5", "--text-file", text_file], "nowhere does not exist"),
        ([tmp_path / "k1", folder, "k1", "--text-file", text_file], "already exists"),
        ([tmp_path / "k1", folder, "o6", "--text-file", text_file, "--epochs", "0"],
         "--epochs 0: healing needs a whole number of passes over its text, 1 or more"),
        ([tmp_path / "k1", folder, "o7", "--text-file", text_file, "--alpha", "1.5"],
         "--alpha 1.5: the distillation weight must be between 0 (LM loss only) and 1 (distillation only"),
    ]
    for argv, message in cases:
        argv = [str(a) if a != argv[2] else str(tmp_path / a) for a in argv]
        assert heal_main(argv) == 2, argv
        err = capsys.readouterr().err
        last_line = err.rstrip("\n").rsplit("\n", 1)[-1]
        assert last_line.startswith("gqe-heal: error: ") and message in last_line and "Traceback" not in err, err
    with pytest.raises(UpcycleError, match="--trainable 'mlp' is not a part of the model; choose one of \\['all', "
                                           "'attention'\\]"):
        heal(str(tmp_path / "k1"), str(folder), str(tmp_path / "o6"), text_file=str(text_file), trainable="mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1", "truncated"]
