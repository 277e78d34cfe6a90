"""The README's main job, `python -m convert.demo`, end to end on the bundled SmolLM2-135M (about 100 s), and how
it finds its data."""

import ast
import re

import pytest
from transformers import AutoConfig

from conftest import SHARED_DATA
from convert import demo
from convert.errors import UpcycleError
from convert.resources import DATA_DIR_VARIABLE, data_folder


def generated_texts(printed: str) -> dict[str, str]:
    """{"source SmolLM2-135M" | "GQE exact" | "GQE sparse K=2": the greedy continuation the demo printed}."""
    lines = re.findall(r"^(source SmolLM2-135M|GQE exact|GQE sparse K=2)[^:\n]*: (.*)$", printed, re.MULTILINE)
    return {name: ast.literal_eval(text) for name, text in lines}


def test_the_main_job_upcycles_smollm2_and_its_exact_conversion_generates_the_sources_text(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--max-new-tokens", "24"]) == 0
    texts = generated_texts(capsys.readouterr().out)
    assert texts.keys() == {"source SmolLM2-135M", "GQE exact", "GQE sparse K=2"}, texts
    assert texts["source SmolLM2-135M"] and texts["GQE sparse K=2"]
    assert texts["GQE exact"] == texts["source SmolLM2-135M"]  # exact mode: token for token
    # Both folders are trust_remote_code checkpoints of the advertised shapes: SmolLM2 has 9 query heads in 3 groups.
    exact = AutoConfig.from_pretrained(tmp_path / "smollm2-gqe-exact", trust_remote_code=True)
    sparse = AutoConfig.from_pretrained(tmp_path / "smollm2-gqe-sparse-k2", trust_remote_code=True)
    assert (exact.num_attention_heads, exact.num_experts_per_tok, exact.active_query_heads) == (18, 3, 10)
    assert (sparse.num_attention_heads, sparse.num_experts_per_tok, sparse.active_query_heads) == (12, 2, 7)
    # Both were converted from the GGUF's dequantised copy, a plain Llama folder (no GGUF quantizer to reload).
    dense = AutoConfig.from_pretrained(tmp_path / "smollm2-135m-instruct")
    assert dense.model_type == "llama" and getattr(dense, "quantization_config", None) is None
    assert (dense.num_attention_heads, dense.num_key_value_heads, dense.num_hidden_layers) == (9, 3, 30)


def test_the_main_job_names_a_missing_data_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path} has no tinyshakespeare.txt: give the folder that holds it." in capsys.readouterr().err
    assert not out.exists()


def test_a_named_data_folder_is_the_only_one_looked_at(tmp_path, monkeypatch):
    """--data-dir and GQE_DATA_DIR are taken at their word: a folder without the data is an error, not a fallback."""
    with pytest.raises(UpcycleError, match=re.escape(f"{tmp_path} has no tinyshakespeare.txt: give the folder")):
        data_folder(tmp_path)
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(UpcycleError, match=f"point {DATA_DIR_VARIABLE} at the folder that holds it"):
        data_folder()
    assert data_folder(SHARED_DATA) == SHARED_DATA.resolve()  # the argument comes before the variable
