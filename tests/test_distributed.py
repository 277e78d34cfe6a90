"""Multi-process training: `accelerate launch` with 2 CPU processes (DDP over gloo) and `Trainer`."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import modeling_gqe  # noqa: F401  (registers "gqe" with the Auto classes)
from ddp_train import PROBE


SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"
REPO_ROOT = SCRIPT.parents[1]


def test_two_process_ddp_training_keeps_replicas_in_sync_and_the_checkpoint_reloads(tmp_path):
    # --multi_gpu picks accelerate's torchrun launcher; with no GPU, Trainer(use_cpu=True) joins over gloo.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", "29517", str(SCRIPT), str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Each rank saw different batches; identical replicas afterwards mean the gradients were all-reduced.
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], atol=0, rtol=0)
    assert (ranks[0]["final"] - ranks[0]["initial"]).abs().max() > 0.1
    losses = ranks[0]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-20").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROBE).logits, ranks[0]["final"], atol=1e-6, rtol=0)
