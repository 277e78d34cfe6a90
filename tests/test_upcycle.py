"""gqe-upcycle: exact mode reproduces each source family; sparse mode beats head dropping; clear CLI errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, char_tokenizer
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from convert.data import blocks_of
from convert.errors import UpcycleError
from convert.heal import heal
from convert.upcycle import UpcycleOptions, main, upcycle


TINY = dict(vocab_size=120, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256)


FAMILIES = ["llama", "mistral", "qwen2", "phi3"]


def build_source(family: str):
    """A tiny random checkpoint of each family in convert/families.py (adding a family adds a branch here)."""
    torch.manual_seed(FAMILIES.index(family))
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=8))
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        model = Phi3ForCausalLM(Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2))
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
    for family in FAMILIES:
        build_source(family).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", FAMILIES)
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
    card = ModelCard.load(out / "README.md")
    assert "exact" in card.text and "active query heads per token | 7" in card.text
    assert card.data.library_name == "transformers" and "gqe" in card.data.tags
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == "modeling_gqe.GQEForCausalLM"


def test_a_local_source_is_not_named_the_cards_base_model(sources, tmp_path, monkeypatch):
    """A relative folder such as sources/llama looks like a hub id (owner/name) but is not one."""
    monkeypatch.chdir(sources.parent)
    upcycle(f"{sources.name}/llama", tmp_path / "gqe", mode="exact", copies=2)
    card = ModelCard.load(tmp_path / "gqe" / "README.md")
    assert card.data.base_model is None and f"`{sources.name}/llama`" in card.text


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_mode_fits_every_family(family, sources, tmp_path, shakespeare_text):
    """Sparse conversion reads each family through the same table; the fit stays closer to the source than
    dropping the same number of heads."""
    from convert.data import load_token_blocks
    from convert.evaluate import perplexity
    from convert.layout import head_dropping_baseline

    folder = tmp_path / family
    shutil.copytree(sources / family, folder)
    tokenizer = char_tokenizer(shakespeare_text[:20_000])
    assert len(tokenizer) <= TINY["vocab_size"]
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:20_000])
    report = upcycle(str(folder), tmp_path / "k1", mode="sparse", top_k=1, calibration_file=str(text),
                     calibration_tokens=2048, held_out_tokens=1024, seq_len=64)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "k1", trust_remote_code=True).eval()
    assert converted.config.active_query_heads == 3  # 2 groups x K = 1, + the shared head
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as the converter reads it (Qwen2 picks its own class)
    held_out = load_token_blocks([text], tokenizer, 64, 2048, held_out_tokens=1024).held_out
    assert perplexity(converted, held_out) == pytest.approx(report["held-out perplexity (converted)"], rel=1e-4)
    source = AutoModelForCausalLM.from_pretrained(folder).eval()

    def divergence_from_source(model):  # mean KL(source || model) per held-out token
        with torch.no_grad():
            expected, actual = source(held_out).logits.log_softmax(-1), model(held_out).logits.log_softmax(-1)
        return (expected.exp() * (expected - actual)).sum(-1).mean().item()

    assert divergence_from_source(converted) < 0.5 * divergence_from_source(head_dropping_baseline(source, 1))


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
        ([str(sources / "llama"), str(tmp_path / "o9"), "--mode", "exact", "--refine-epochs", "-1"],
         "--refine-epochs must be a whole number, 0 (off) or more, got -1"),
        ([str(sources / "llama"), str(tmp_path / "o10"), "--mode", "exact", "--refine-learning-rate", "0"],
         "--refine-learning-rate must be positive, got 0.0"),
        ([str(sources / "llama"), str(tmp_path / "o11"), "--mode", "exact", "--refine-batch-size", "0"],
         "--refine-batch-size must be a whole number, 1 or more, got 0"),
        ([str(sources / "llama"), str(tmp_path / "o12"), "--mode", "sparse", "--top-k", "1", "--drift-correction", "2"],
         "--drift-correction must be between 0 (layer-local targets) and 1 (the whole drift), got 2.0"),
        ([str(sources / "llama"), str(tmp_path / "o13"), "--mode", "sparse", "--top-k", "1", "--dense-layers", "2"],
         "'2' is not within the source's layers 0-1"),
        ([str(sources / "llama"), str(tmp_path / "o14"), "--mode", "sparse", "--top-k", "1", "--dense-layers", "0-1"],
         "keeps every layer dense: nothing would be converted"),
        ([str(sources / "llama"), str(tmp_path / "o15"), "--mode", "sparse", "--top-k", "1", "--dense-layers", "1-x"],
         "'1-x' is not a layer or a range of layers"),
        ([str(sources / "llama"), str(tmp_path / "o16"), "--mode", "exact", "--dense-layers", "1"],
         "--dense-layers applies to --mode sparse"),
        ([str(sources / "llama"), str(sources / "mistral"), "--mode", "exact"], "already exists"),
    ]
    for argv, message in cases:
        if "--top-k" in argv and "--calibration-file" not in argv:
            argv += ["--calibration-file", __file__]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        if Path(argv[1]).parent == tmp_path:
            assert not Path(argv[1]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "gpt2"]  # no partial outputs


def broken_copy(sources, tmp_path, name, family="llama"):
    folder = tmp_path / name
    shutil.copytree(sources / family, folder)
    return folder


def test_broken_inputs_end_in_one_line_naming_the_file_and_leave_nothing(sources, tmp_path, capsys, monkeypatch):
    """Every failure that comes from the user's files: exit 2, one line on stderr naming the file and the fix."""
    from safetensors.torch import load_file, save_file

    weights = load_file(sources / "llama" / "model.safetensors")
    truncated = broken_copy(sources, tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = broken_copy(sources, tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64 + bytes(range(256)) * 8)
    missing = broken_copy(sources, tmp_path, "missing")
    save_file({k: v for k, v in weights.items() if "layers.1.self_attn.k_proj" not in k},
              missing / "model.safetensors", metadata={"format": "pt"})
    reshaped = broken_copy(sources, tmp_path, "reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "intermediate_size": 160}))
    bad_config = broken_copy(sources, tmp_path, "bad_config")
    (bad_config / "config.json").write_text("{not json")
    bad_tokenizer = broken_copy(sources, tmp_path, "bad_tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text("{garbage")
    (bad_tokenizer / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 16)
    mha = tmp_path / "mha"
    LlamaForCausalLM(LlamaConfig(**{**TINY, "num_key_value_heads": 6})).save_pretrained(mha)
    not_a_folder = tmp_path / "plain_file"
    not_a_folder.write_text("x")
    text = tmp_path / "text.txt"
    text.write_text("some text " * 200)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "some text"}\n' * 20)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    cases = [
        ([truncated, "o1", "--mode", "exact"], ["truncated/model.safetensors", "truncated or corrupt"]),
        ([garbage, "o2", "--mode", "exact"], ["garbage/model.safetensors", "truncated or corrupt"]),
        ([missing, "o3", "--mode", "exact"], ["lacks weights", "model.layers.1.self_attn.k_proj.weight"]),
        ([reshaped, "o4", "--mode", "exact"], ["do not match its config.json", "model.layers."]),
        ([bad_config, "o5", "--mode", "exact"], ["bad_config/config.json", "not a valid JSON"]),
        ([bad_tokenizer, "o6", "--mode", "sparse", "--top-k", "1", "--calibration-file", text],
         ["bad_tokenizer/tokenizer.json", "cannot be read"]),
        ([gguf, "o7", "--mode", "exact", "--gguf-file", "model.gguf"], ["gguf/model.gguf", "not a readable GGUF"]),
        ([mha, "o8", "--mode", "sparse", "--top-k", "1", "--calibration-file", text],
         ["one query head per KV head", "--mode exact"]),
        ([sources / "llama", not_a_folder / "o9", "--mode", "exact"], ["cannot create the folder", "plain_file"]),
    ]
    for argv, fragments in cases:
        argv = [str(argv[0]), str(argv[1] if "/" in str(argv[1]) else tmp_path / argv[1]), *map(str, argv[2:])]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err  # progress bars may come first; the error is one line, and the last
        last_line = err.rstrip("\n").rsplit("\n", 1)[-1]
        assert last_line.startswith("gqe-upcycle: error: ") and err.count("gqe-upcycle: error") == 1, err
        assert "Traceback" not in err and all(fragment in last_line for fragment in fragments), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial folder

    # Bad calibration data is refused before any weights are read.
    with_tokenizer = broken_copy(sources, tmp_path, "with_tokenizer")
    char_tokenizer("abcdefghijklmnopqrstuvwxyz ").save_pretrained(with_tokenizer)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the data was checked")

    monkeypatch.setattr("convert.upcycle.read_source_weights", no_weights)
    argv = [str(with_tokenizer), str(tmp_path / "o10"), "--mode", "sparse", "--top-k", "1", "--calibration-data", str(rows)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last_line = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last_line.startswith("gqe-upcycle: error: ") and "Traceback" not in err, err
    assert "rows.jsonl has no column 'text'" in last_line and "column=NAME" in last_line
    assert not (tmp_path / "o10").exists()


def test_options_are_defined_once_and_unknown_names_are_refused(sources, tmp_path, capsys):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['calibration_fle'\]"):
        upcycle(str(sources / "llama"), tmp_path / "x", mode="sparse", top_k=1, calibration_fle="notes.txt")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['token'\]"):
        heal(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), token=4096)
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:  # the command line is generated from the same dataclass
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(UpcycleOptions):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name


def test_console_script_is_installed():
    result = subprocess.run(["gqe-upcycle", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--mode" in result.stdout and "--calibration-file" in result.stdout


# ------------------------------------------------------------------------------------- real SmolLM2-135M GGUF


def test_smollm2_gguf_cut_short_in_its_tensors_is_named_before_any_output(tmp_path, capsys):
    """Half of the real file: its metadata reads, its tensors do not. The config read fails on it (the GGUF file is
    checked only then, not parsed twice) and the error names the file as truncated."""
    from convert.resources import SMOLLM2_GGUF, smollm2_folder

    whole = (smollm2_folder() / SMOLLM2_GGUF).read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.gguf").write_bytes(whole[: len(whole) // 2])
    assert main([str(cut), str(tmp_path / "out"), "--mode", "exact", "--gguf-file", "model.gguf"]) == 2
    err = capsys.readouterr().err
    last_line = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last_line.startswith("gqe-upcycle: error: ") and "Traceback" not in err, err
    assert "cut/model.gguf is not a readable GGUF file" in last_line and "truncated or corrupt" in last_line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def wikitext_ids(smollm2_source):
    _, tokenizer = smollm2_source
    text = (SHARED_DATA / "wikitext2_test.raw").read_text()[:100_000]
    return blocks_of(tokenizer(text).input_ids, 96, max_tokens=4 * 96)


def test_smollm2_exact_matches_the_gguf_source_on_real_text(smollm2_source, smollm2_conversions, wikitext_ids):
    source, tokenizer = smollm2_source
    out, report = smollm2_conversions["exact"]
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


def test_smollm2_sparse_beats_head_dropping(smollm2_source, smollm2_conversions):
    from convert.data import load_token_blocks
    from convert.evaluate import perplexity
    from convert.layout import head_dropping_baseline

    source, tokenizer = smollm2_source
    out, report, text_file = smollm2_conversions["sparse"]
    converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert converted.config.num_experts_per_tok == 2 and converted.config.active_query_heads == 7
    held_out = load_token_blocks([text_file], tokenizer, 256, 4096, held_out_tokens=2048).held_out
    ppl_converted = perplexity(converted, held_out)
    ppl_dropping = perplexity(head_dropping_baseline(source, keep_per_group=2), held_out)
    assert ppl_converted == pytest.approx(report["held-out perplexity (converted)"], rel=1e-3)
    assert ppl_converted < 0.5 * ppl_dropping, (ppl_converted, ppl_dropping)
    assert report["perplexity ratio"] < 2.5


def test_block_partitions_are_every_split_once():
    from math import factorial

    from convert.layout import block_partitions

    for heads, sizes, count in [(3, [1, 2], 3), (4, [2, 2], 3), (7, [3, 4], 35), (8, [2, 2, 2, 2], 105)]:
        partitions = list(block_partitions(list(range(heads)), sizes))
        assert len(partitions) == count
        assert all(sorted(h for block in blocks for h in block) == list(range(heads)) for blocks in partitions)
        assert len({tuple(map(tuple, blocks)) for blocks in partitions}) == count
    assert count == factorial(8) // (factorial(2) ** 4 * factorial(4))


def test_least_dropped_layout_pairs_heads_that_are_rarely_needed_together(monkeypatch):
    """Heads 1 and 2 matter most on average but never on the same token: sharing a slot costs nothing there,
    while the importance layout gives head 1 its own slot and pairs head 0 with head 2."""
    import convert.layout
    from convert.layout import least_dropped_blocks, sparse_blocks

    contribution = torch.tensor([[1.0, 3.0, 0.0], [1.0, 0.0, 3.0]]).repeat(5, 1)
    importance = contribution.mean(0).argsort(descending=True).tolist()
    assert sparse_blocks(importance, 2) == [[1, 1], [2, 0]]
    assert least_dropped_blocks(contribution, 2) == [[0, 0], [1, 2]]

    def dropped(blocks):  # mean contribution lost when each block keeps its largest head per token
        kept = sum(contribution[:, sorted(set(block))].max(1).values for block in blocks)
        return (contribution.sum(1) - kept).mean().item()

    assert dropped(least_dropped_blocks(contribution, 2)) == 0 < dropped(sparse_blocks(importance, 2)) == 0.5
    generator = torch.Generator().manual_seed(0)
    for r, k in [(4, 2), (6, 3), (8, 2)]:  # never worse than the importance layout
        contribution = torch.rand(64, r, generator=generator) ** 3
        by_importance = contribution.mean(0).argsort(descending=True).tolist()
        assert dropped(least_dropped_blocks(contribution, k)) <= dropped(sparse_blocks(by_importance, k)) + 1e-6
    monkeypatch.setattr(convert.layout, "MAX_PARTITIONS", 2)  # too many splits to score: the importance layout
    assert least_dropped_blocks(contribution, 2) == sparse_blocks(by_importance, 2)


def test_fit_error_layout_leaves_no_group_a_better_split(monkeypatch):
    """`block_layout="fit-error"` keeps a split of each group's heads that no other split of any one group beats
    (coordinate descent), by how far the converted layer's output is from the source attention's after the first
    position: measured here directly on the layer, for all 9 layouts of a one-layer source (2 groups of r = 3 heads, K = 2: each group
    gives one of its heads a slot of its own), each fitted by the "importance" path forced to that layout."""
    import itertools

    import convert.fit
    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    torch.manual_seed(1)
    source = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 1})).eval()
    with torch.no_grad():  # peaked attention, so that the heads differ and dropping one costs something
        source.model.layers[0].self_attn.q_proj.weight.mul_(30.0)
        source.model.layers[0].self_attn.k_proj.weight.mul_(30.0)
    fit_ids = torch.randint(0, TINY["vocab_size"], (32, 32), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def attention_error(model):
        hidden = source.model.layers[0].input_layernorm(source.model.embed_tokens(fit_ids))
        position_embeddings = source.model.rotary_emb(hidden, torch.arange(32)[None])
        wanted = source.model.layers[0].self_attn(hidden, position_embeddings=position_embeddings,
                                                  attention_mask=None)[0]
        output = model.model.layers[0].self_attn(hidden, position_embeddings=position_embeddings,
                                                 attention_mask=None)[0]
        # on the positions after the first (where a query reads more than its own position), as the search does
        return (output - wanted)[:, 1:].pow(2).sum().item() / wanted[:, 1:].pow(2).sum().item()

    def conversion(block_layout="importance"):
        model = build_sparse_initial(source, 2)
        expert_heads = calibrate_sparse(source, model, fit_ids, block_layout=block_layout)[0]  # [G*M]
        own_slot = (expert_heads[0].item() % 3, expert_heads[4].item() % 3)  # each group's head with a slot of its own
        return own_slot, attention_error(model)

    importance_layout, importance_error = conversion()
    errors = {}
    for layout in itertools.product(range(3), repeat=2):
        splits = [[[head, head], [other for other in range(3) if other != head]] for head in layout]
        monkeypatch.setattr(convert.fit, "sparse_blocks", lambda heads, k, width, splits=splits: splits.pop(0))
        forced_layout, errors[layout] = conversion()
        assert forced_layout == layout
    monkeypatch.undo()
    assert errors[importance_layout] == pytest.approx(importance_error, rel=1e-5)

    chosen, chosen_error = conversion("fit-error")
    assert chosen_error == pytest.approx(errors[chosen], rel=1e-5)  # the layer holds the chosen layout's fit
    assert chosen_error < importance_error  # here the search has a better layout to find
    for group in range(2):
        for head in range(3):
            neighbour = tuple(head if g == group else chosen[g] for g in range(2))
            assert chosen_error <= errors[neighbour] * (1 + 1e-5)


def test_unknown_block_layout_is_refused(sources, tmp_path):
    expected = "--block-layout must be one of \\['importance', 'least-dropped', 'fit-error'\\]"
    with pytest.raises(UpcycleError, match=expected):
        upcycle(str(sources / "llama"), tmp_path / "out", mode="sparse", top_k=1, block_layout="random",
                calibration_file=__file__)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dense_layers,layer_top_k", [([], None), ([0], None), ([], [1, 2])],
                         ids=["all-routed", "layer-0-dense", "layer-0-k1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_of_a_converted_model_is_set_by_the_conversion(family, dense_layers, layer_top_k, monkeypatch):
    """The GQE model is built without random initialisation (`layout.unfilled_gqe_model`: zeros), since the
    conversion sets every weight. Built instead on a model whose every weight is random, exact and calibrated
    sparse conversions come out the same to the bit: no weight keeps what it was built with (a dense layer's
    included)."""
    from convert import layout
    from convert.fit import calibrate_sparse

    source = build_source(family)
    fit_ids = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))

    def convert():
        exact = layout.build_exact(source, copies=2, noise=0.0, seed=0)
        sparse = layout.build_sparse_initial(source, 2, dense_layers, layer_top_k)
        calibrate_sparse(source, sparse, fit_ids)
        return exact.state_dict(), sparse.state_dict()

    from_zeros = convert()

    def random_model(config):
        model = layout.GQEForCausalLM(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():  # routers and norms too, which initialise to constants
                parameter.normal_(generator=torch.Generator().manual_seed(parameter.numel()))
        return model

    monkeypatch.setattr(layout, "unfilled_gqe_model", random_model)
    for expected, actual in zip(from_zeros, convert()):
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layers_keep_the_source_attention_and_the_rest_is_fitted(family, sources, tmp_path, shakespeare_text):
    """`--dense-layers 0`: layer 0 keeps the source's attention (its weights, so the residual stream after it is the
    source's to float precision), layer 1 is converted and fitted as without the option, and the written folder
    loads with trust_remote_code, its card naming the dense layer."""
    folder = tmp_path / family
    shutil.copytree(sources / family, folder)
    char_tokenizer(shakespeare_text[:20_000]).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:20_000])
    fit = dict(mode="sparse", top_k=1, calibration_file=str(text), calibration_tokens=2048, held_out_tokens=1024,
               seq_len=64)
    assert main([str(folder), str(tmp_path / "dense0"), "--mode", "sparse", "--top-k", "1", "--calibration-file",
                 str(text), "--calibration-tokens", "2048", "--held-out-tokens", "1024", "--seq-len", "64",
                 "--dense-layers", "0"]) == 0
    upcycle(str(folder), tmp_path / "routed", **fit)
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "dense0", trust_remote_code=True).eval()
    routed = AutoModelForCausalLM.from_pretrained(tmp_path / "routed", trust_remote_code=True).eval()
    assert converted.config.dense_attention_layers == [0] and converted.config.dense_num_attention_heads == 6
    input_ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual, without = (model(input_ids, output_hidden_states=True) for model in (source, converted, routed))
    torch.testing.assert_close(actual.hidden_states[1], expected.hidden_states[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without.hidden_states[1], expected.hidden_states[1], atol=1e-3)
    # Layer 1 sees the source's input in the dense conversion, so it is fitted on other inputs than without it.
    assert not torch.equal(converted.model.layers[1].self_attn.o_proj.weight, routed.model.layers[1].self_attn.o_proj.weight)
    assert (actual.logits - expected.logits).abs().max() > 1e-3  # the routed layer still drops heads
    card = (tmp_path / "dense0" / "README.md").read_text()
    assert "dense attention layers | 0" in card and "6 in the 1 dense layers" in card


def test_layer_top_k_fits_its_layers_at_their_own_k(sources, tmp_path, shakespeare_text):
    """`--top-k 2 --layer-top-k 1:0`: layer 0 attends one head per group (and the shared head) over the K = 2 layout's
    M = 4 experts, which hold each group's 3 heads; layer 1 keeps k = 2. Layer 0 sees the embeddings, as a --top-k 1
    conversion's layer 0 does, and is fitted like it: their outputs differ by under 5% of the --top-k 1 layer's distance
    from the source attention's output (the layouts differ by a duplicated expert, which shifts the weighted slot)."""
    folder = tmp_path / "llama"
    shutil.copytree(sources / "llama", folder)
    char_tokenizer(shakespeare_text[:20_000]).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:20_000])
    fit = ["--mode", "sparse", "--calibration-file", str(text), "--calibration-tokens", "2048", "--held-out-tokens",
           "1024", "--seq-len", "64"]
    assert main([str(folder), str(tmp_path / "mixed"), *fit, "--top-k", "2", "--layer-top-k", "1:0"]) == 0
    assert main([str(folder), str(tmp_path / "k1"), *fit, "--top-k", "1"]) == 0
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", trust_remote_code=True).eval()
    k1 = AutoModelForCausalLM.from_pretrained(tmp_path / "k1", trust_remote_code=True).eval()
    config, d = mixed.config, mixed.config.head_dim
    assert config.layer_num_experts_per_tok == [1, 2] and config.num_attention_heads == 8
    attentions = [layer.self_attn for layer in mixed.model.layers]
    assert [attn.top_k for attn in attentions] == [1, 2]
    assert [attn.o_proj.in_features for attn in attentions] == [(2 * 1 + 2) * d, (2 * 2 + 2) * d]
    source_rows = source.model.layers[0].self_attn.q_proj.weight.view(6, d, -1)
    expert_rows = attentions[0].q_proj.weight.view(8, d, -1)
    for g in range(2):  # each group's four experts are its three heads, one of them twice
        heads = {next(h for h in range(6) if torch.equal(expert_rows[e], source_rows[h])) for e in range(4 * g, 4 * g + 4)}
        assert heads == {3 * g, 3 * g + 1, 3 * g + 2}

    input_ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = source.model.layers[0].input_layernorm(source.model.embed_tokens(input_ids))
        position_embeddings = source.model.rotary_emb(hidden, torch.arange(24)[None])
        outputs = [model.model.layers[0].self_attn(hidden, position_embeddings=position_embeddings,
                                                   attention_mask=None)[0] for model in (source, mixed, k1)]
    wanted, mixed_output, k1_output = outputs
    assert (mixed_output - k1_output).norm() < 0.05 * (k1_output - wanted).norm()
    assert (mixed_output - wanted).norm() > 1e-3 * wanted.norm()  # one head per group is not the source's three
    card = (tmp_path / "mixed" / "README.md").read_text()
    assert "2 (partitioned routing); 1 in layers 0" in card and "query heads attended per token, all layers | 8" in card


@pytest.mark.parametrize("fields,message", [
    (dict(layer_top_k=["3:0"]), r"k = 3 cannot be laid out in a --top-k 2 conversion .* Choose among \[1, 2\]"),
    (dict(layer_top_k=["1:2"]), r"--layer-top-k '1:2': '2' is not within the source's layers 0-1"),
    (dict(layer_top_k=["1"]), r"'1' is not K:LAYERS"),
    (dict(layer_top_k=["1:"]), r"'1:' names no layer"),
    (dict(layer_top_k=["1:0", "2:0"]), r"names layers \[0\] already given a k or kept dense"),
    (dict(layer_top_k=["1:0"], dense_layers="0"), r"names layers \[0\] already given a k or kept dense"),
    (dict(layer_top_k=["1:0"], mode="exact"), r"--layer-top-k applies to --mode sparse"),
])
def test_bad_layer_top_k_is_refused_before_any_model_work(fields, message, sources, tmp_path):
    options = {**dict(mode="sparse", top_k=2, calibration_file=__file__), **fields}
    with pytest.raises(UpcycleError, match=message):
        upcycle(str(sources / "llama"), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_calibration_reports_the_source_head_of_every_expert():
    """calibrate_sparse returns, per layer, the source head each expert copies: its q_proj rows are that head's,
    the head belongs to the expert's group, and every head of the group has an expert."""
    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    source = build_source("llama")
    model = build_sparse_initial(source, 2)
    fit_ids = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    expert_heads = calibrate_sparse(source, model, fit_ids)
    config, d = model.config, model.config.head_dim
    G, M = config.num_key_value_heads, config.num_experts_per_group
    r = TINY["num_attention_heads"] // G
    assert expert_heads.shape == (TINY["num_hidden_layers"], G * M)
    for layer, source_layer, heads in zip(model.model.layers, source.model.layers, expert_heads):
        expert_rows = layer.self_attn.q_proj.weight.view(G * M, d, -1)
        head_rows = source_layer.self_attn.q_proj.weight.view(-1, d, expert_rows.shape[-1])
        torch.testing.assert_close(expert_rows, head_rows[heads], rtol=0, atol=0)
        for g in range(G):
            assert set(heads[g * M : (g + 1) * M].tolist()) == set(range(g * r, (g + 1) * r))



def test_smollm2_gguf_source_becomes_a_plain_model_with_the_same_weights(smollm2_source):
    """GGUF-loaded models carry a quantized flag (Trainer refuses them, `.to(dtype)` refuses to cast them);
    `as_plain_model` builds an unflagged model, without random initialisation, holding every weight to the bit."""
    from convert.sources import as_plain_model

    source, _ = smollm2_source
    assert source.is_quantized
    plain = as_plain_model(source)
    assert not getattr(plain, "is_quantized", False) and type(plain) is type(source)
    # Its config no longer names the GGUF quantizer (a saved copy is a plain folder); the source's still does.
    assert getattr(plain.config, "quantization_config", None) is None and source.config.quantization_config
    expected, actual = source.state_dict(), plain.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    input_ids = torch.randint(0, source.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, source(input_ids).logits, rtol=0, atol=0)
    assert plain.to(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("drift_correction", [0.0, 0.5])
def test_output_projection_is_the_ridge_fit_of_the_blended_target(drift_correction):
    """The last layer's o_proj is the weighted ridge regression, on the converted attention's slot features, of the
    source attention's output on the converted input plus `drift_correction` times the residual stream's drift: the
    source's stream after its own attention minus the converted stream with the source attention added. Rebuilt here
    from the two models' own forwards (their hidden states entering the layer), not from the fit's running streams.
    At layer 0 the two streams are the same embedding, so the correction changes that layer by rounding alone."""
    from convert.fit import calibrate_sparse
    from convert.layout import build_sparse_initial

    source = build_source("llama")
    fit_ids = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    model = build_sparse_initial(source, 2)
    first_token_weight, output_ridge = 2048.0, 3e-4
    calibrate_sparse(source, model, fit_ids, first_token_weight=first_token_weight, output_ridge=output_ridge,
                     drift_correction=drift_correction)
    plain = build_sparse_initial(source, 2)
    calibrate_sparse(source, plain, fit_ids)
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.weight,
                               plain.model.layers[0].self_attn.o_proj.weight, rtol=1e-5, atol=1e-7)  # rounding

    last = TINY["num_hidden_layers"] - 1
    with torch.no_grad():
        source_stream = source(fit_ids, output_hidden_states=True).hidden_states[last]  # entering the last layer
        converted_stream = model(fit_ids, output_hidden_states=True).hidden_states[last]
        source_layer, layer = source.model.layers[last], model.model.layers[last]
        position_embeddings = source.model.rotary_emb(source_stream, torch.arange(32)[None])

        def source_attention(stream):
            return source_layer.self_attn(source_layer.input_layernorm(stream), position_embeddings=position_embeddings,
                                          attention_mask=None)[0]

        local = source_attention(converted_stream)
        drift = source_stream + source_attention(source_stream) - (converted_stream + local)
        target = (local + drift_correction * drift).double()
        seen = {}
        layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: seen.update(features=args[0]))
        layer.self_attn(layer.input_layernorm(converted_stream), position_embeddings=position_embeddings,
                        attention_mask=None)
    row_weight = torch.ones(32, dtype=torch.float64)
    row_weight[0] = first_token_weight
    features = (seen["features"].double() * row_weight.sqrt()[:, None]).flatten(0, 1)
    target = (target * row_weight.sqrt()[:, None]).flatten(0, 1)
    gram = features.T @ features
    ridge = output_ridge * gram.diagonal().mean()
    expected = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), features.T @ target)
    torch.testing.assert_close(layer.self_attn.o_proj.weight.double(), expected.T, rtol=1e-4, atol=1e-5)
    if drift_correction:
        assert not torch.allclose(layer.self_attn.o_proj.weight, plain.model.layers[last].self_attn.o_proj.weight)
