"""Multi-process runs on 2 CPU processes over gloo: `accelerate launch` with `Trainer` (DDP), FSDP2, and
transformers' own tensor, pipeline and FSDP parallelism at load time."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import fsdp_train
import modeling_gqe  # noqa: F401  (registers "gqe" with the Auto classes)
import native_parallel
from conftest import setting_model
from ddp_train import PROBE


SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"
FSDP_SCRIPT = SCRIPT.with_name("fsdp_train.py")
NATIVE_PARALLEL_SCRIPT = SCRIPT.with_name("native_parallel.py")
REPO_ROOT = SCRIPT.parents[1]


def run_two_processes(command: list[str], **extra_env) -> None:
    """Runs a 2-process launch from the repository root, offline, and fails with its stderr if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **extra_env}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def torchrun(script: Path, *args: str, port: int) -> None:
    run_two_processes([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(port), str(script), *args], OMP_NUM_THREADS="1")


def test_two_process_ddp_training_keeps_replicas_in_sync_and_the_checkpoint_reloads(tmp_path):
    # --multi_gpu picks accelerate's torchrun launcher; with no GPU, Trainer(use_cpu=True) joins over gloo.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", "29517", str(SCRIPT), str(tmp_path),
    ]
    run_two_processes(command)

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


def test_fsdp2_sharded_training_takes_the_single_process_steps(tmp_path):
    """Each decoder layer sharded by FSDP2 across 2 processes (accelerate offers FSDP on GPUs only, so this calls
    `fully_shard` as accelerate's FSDP2 does): the routers, the shared head and every projection are gathered for
    each layer's forward and backward, and the gradients reduce-scattered. Five AdamW steps give the weights of the
    same steps taken in one process on the whole batches."""
    torchrun(FSDP_SCRIPT, str(tmp_path), port=29518)
    sharded = torch.load(tmp_path / "fsdp.pt")
    assert sharded["world_size"] == 2
    assert sharded["shards"] == {"router": (4, 64), "router_full": (8, 64)}  # each rank held half of each weight

    reference = fsdp_train.build_model()
    losses = fsdp_train.train(reference, parts=2)
    rank_losses = torch.tensor(sharded["losses"])  # [ranks, steps]
    torch.testing.assert_close(rank_losses.mean(dim=0), torch.tensor(losses), atol=1e-5, rtol=0)
    assert losses[-1] < losses[0] - 0.1, losses
    expected = reference.state_dict()
    assert sharded["state"].keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(sharded["state"][name], weight, atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["tp", "pp", "fsdp"])
def test_transformers_parallelism_at_load_time_gives_the_single_process_results(mode, tmp_path):
    """`from_pretrained(tp_plan="auto")` shards the MLP by the config's `base_model_tp_plan` (the attention stays
    whole: see GQEConfig); `DistributedConfig(pp_size=2)` splits the layers by `base_model_pp_plan`;
    `DistributedConfig(fsdp_size=2)` shards every weight. Each gives the single-process logits and greedy tokens, and
    the tensor-parallel model trains to the single-process weights."""
    if mode != "tp":
        distributed = pytest.importorskip("transformers.distributed")
        if f"{mode}_size" not in inspect.signature(distributed.DistributedConfig).parameters:
            pytest.skip(f"transformers {transformers.__version__}'s DistributedConfig has no {mode}_size")
    model = setting_model(("gqe", "ranked", 2), eos_token_id=None)
    model.save_pretrained(tmp_path / "checkpoint")
    torchrun(NATIVE_PARALLEL_SCRIPT, mode, str(tmp_path / "checkpoint"), str(tmp_path), port=29519)
    ranks = [torch.load(tmp_path / f"{mode}_rank{rank}.pt") for rank in (0, 1)]

    with torch.no_grad():
        expected_logits = model(native_parallel.INPUT_IDS).logits
        expected_tokens = model.generate(native_parallel.INPUT_IDS, max_new_tokens=6, do_sample=False)
    total = sum(param.numel() for param in model.parameters())
    with_logits = [rank for rank in ranks if rank["logits"] is not None]
    assert with_logits
    for rank in with_logits:
        torch.testing.assert_close(rank["logits"], expected_logits, atol=1e-5, rtol=1e-5)
    for rank in ranks:
        assert torch.equal(rank["tokens"], expected_tokens)
        assert rank["parameter_elements"] < total  # each rank holds only part of the model
        if mode in ("tp", "fsdp"):  # half of up_proj's 96 rows
            assert rank["up_proj_local_shape"] == (48, 64)
    if mode == "pp":  # one decoder layer per stage
        assert [rank["layers_held"] for rank in ranks] == [[0], [1]]
    if mode == "tp":
        losses = native_parallel.train_steps(model)
        for index, rank in enumerate(ranks):
            torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
            for name, weight in model.state_dict().items():
                trained = rank["trained"][name]
                if trained.shape != weight.shape:  # transformers 5.5 keeps this rank's shard as a plain tensor
                    split_dim = 0 if trained.shape[0] != weight.shape[0] else 1
                    weight = weight.chunk(2, dim=split_dim)[index]
                torch.testing.assert_close(trained, weight, atol=5e-5, rtol=0, msg=name)
