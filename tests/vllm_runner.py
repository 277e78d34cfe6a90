"""Runs in the vLLM virtual environment (started by tests/test_vllm.py): greedy generation with vLLM for a list of
jobs, one engine per checkpoint folder, all in one process so vLLM is imported once.

    python tests/vllm_runner.py JOBS.json RESULTS.json

JOBS.json: [{"name": ..., "folder": ..., "prompts": [[token ids], ...], "max_tokens": N,
             "engine": {extra LLM(...) arguments}, "env": {environment variables for this engine}}]
RESULTS.json: [{"name": ..., "token_ids": [[...], ...]} or {"name": ..., "error": "the exception's text"}]
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: the tests' models are small


def main(jobs_path: str, results_path: str) -> None:
    from vllm import LLM, SamplingParams

    results = []
    for job in json.load(open(jobs_path)):
        engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, **job.get("engine", {})}
        saved_env = dict(os.environ)
        os.environ.update(job.get("env", {}))  # read by the engine processes this LLM spawns
        try:
            llm = LLM(model=job["folder"], **engine)
            outputs = llm.generate(
                [{"prompt_token_ids": prompt} for prompt in job["prompts"]],
                SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True),
                use_tqdm=False,
            )
            results.append({"name": job["name"], "token_ids": [list(o.outputs[0].token_ids) for o in outputs]})
            del llm
        except Exception as error:  # reported to the test, which checks the message
            results.append({"name": job["name"], "error": f"{type(error).__name__}: {error}"})
        os.environ.clear()
        os.environ.update(saved_env)
        gc.collect()
        json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
