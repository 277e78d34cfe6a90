"""Checkpoints round-trip: in-process Auto classes, and trust_remote_code folders in a clean process."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import pytest
from conftest import REPO_ROOT, SETTING_IDS, SETTINGS, setting_model, tiny_model
from modeling_gqe import GQEForQuestionAnswering, GQEForSequenceClassification, GQEForTokenClassification, GQEModel


FIXTURES = REPO_ROOT / "tests" / "fixtures" / "checkpoints-0.1"


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_save_and_auto_load_reproduce_logits(setting, tmp_path):
    model = setting_model(setting)
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(3, 97, (2, 10))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    assert isinstance(AutoModel.from_pretrained(tmp_path), GQEModel)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3), GQEForSequenceClassification)
    assert isinstance(AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=3), GQEForTokenClassification)
    assert isinstance(AutoModelForQuestionAnswering.from_pretrained(tmp_path), GQEForQuestionAnswering)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "gqe"


def test_loaded_weights_are_never_reinitialised(tmp_path):
    """The router is zero-initialised in a new model but must keep its trained values after loading."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["model.layers.0.self_attn.router.weight"].abs().sum() > 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    fresh = type(model)(model.config)
    assert fresh.model.layers[0].self_attn.router.weight.abs().sum() == 0


def test_save_pretrained_writes_auto_map_and_standalone_files(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gqe"
    assert config["auto_map"]["AutoConfig"] == "configuration_gqe.GQEConfig"
    # Every GQE class, not only the one saved: the folder must serve each Auto class with trust_remote_code.
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gqe.GQEConfig",
        "AutoModel": "modeling_gqe.GQEModel",
        "AutoModelForCausalLM": "modeling_gqe.GQEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_gqe.GQEForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_gqe.GQEForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_gqe.GQEForQuestionAnswering",
    }
    assert (tmp_path / "configuration_gqe.py").exists() and (tmp_path / "modeling_gqe.py").exists()


@pytest.mark.parametrize("setting", [("gqe", "ranked", 1), ("gqe", "partitioned", 2), ("weighted_concat", "ranked", 3)],
                         ids=["gqe-ranked-k1", "gqe-partitioned-k2", "weighted_concat-ranked-k3"])
def test_trust_remote_code_folder_loads_in_a_process_that_never_imports_the_package(setting, tmp_path):
    folder = tmp_path / "checkpoint"
    model = setting_model(setting)
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "modeling_gqe" not in sys.modules, "the package must not be imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            logits = model(data["input_ids"]).logits
        torch.testing.assert_close(logits, data["expected"], atol=0, rtol=0)
        print("remote-code-ok", type(model).__name__)
        # The task heads load from the same causal-LM folder, their decoder the saved one.
        import transformers
        for auto_class, name in [("AutoModel", "GQEModel"),
                                 ("AutoModelForSequenceClassification", "GQEForSequenceClassification"),
                                 ("AutoModelForTokenClassification", "GQEForTokenClassification"),
                                 ("AutoModelForQuestionAnswering", "GQEForQuestionAnswering")]:
            head = getattr(transformers, auto_class).from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(head).__name__ == name, (auto_class, type(head))
            decoder = head if name == "GQEModel" else head.model
            torch.testing.assert_close(decoder.embed_tokens.weight, model.model.embed_tokens.weight, atol=0, rtol=0)
        print("remote-code-heads-ok")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    # Run from an empty folder so that the repository is not on sys.path.
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env={k: v for k, v in env.items() if k != "PYTHONPATH"},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code-ok GQEForCausalLM" in result.stdout
    assert "remote-code-heads-ok" in result.stdout


@pytest.mark.parametrize("name", ["gqe-ranked-k1", "gqe-partitioned-k2", "hard_concat-ranked-k2",
                                  "weighted_concat-partitioned-k2"])
def test_checkpoints_saved_by_version_0_1_load_and_give_the_same_logits(name):
    """Weights written before the shared head's K/V was cached (tests/fixtures/checkpoints-0.1, made with commit
    207d3ba's code, logits included) give the same logits through today's code: the parameters did not change."""
    expected = torch.load(FIXTURES / "expected_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    keep = expected["attention_mask"].bool()  # padded positions' logits are not meaningful
    torch.testing.assert_close(logits[keep], expected[name][keep], atol=1e-5, rtol=1e-5)
