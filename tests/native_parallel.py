"""Loads a saved GQE checkpoint with transformers' own parallelism (run by tests/test_distributed.py):

    torchrun --nproc_per_node 2 tests/native_parallel.py MODE CHECKPOINT OUT_DIR   # CPU: gloo

MODE "tp": `tp_plan="auto"` (the config's `base_model_tp_plan`: the MLP sharded), then a forward, greedy
generation and three AdamW steps. "pp" and "fsdp": `DistributedConfig(pp_size=2)` / `(fsdp_size=2)`, then a
forward and greedy generation. Each rank writes OUT_DIR/MODE_rank{i}.pt: the logits, tokens and losses it got, the
local shape of layer 0's up_proj weight, how many parameter elements and which decoder layers it holds and, for
"tp", the full weights after training.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import modeling_gqe  # noqa: F401  (registers "gqe" with the Auto classes)

INPUT_IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])
TRAIN_BATCHES = torch.randint(1, 60, (3, 4, 16), generator=torch.Generator().manual_seed(0))


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train_steps(model) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in TRAIN_BATCHES:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(mode: str, checkpoint: str, out_dir: str):
    if mode == "tp":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto")
    else:
        from transformers.distributed import DistributedConfig

        parallel = DistributedConfig(pp_size=2) if mode == "pp" else DistributedConfig(fsdp_size=2)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=parallel)
    model.eval()
    rank = dist.get_rank()
    parameters = dict(model.named_parameters())
    up_proj = parameters.get("model.layers.0.mlp.up_proj.weight")  # a pipeline stage holds some layers only
    result = {
        "up_proj_local_shape": None if up_proj is None else tuple(local(up_proj).shape),
        "parameter_elements": sum(local(param).numel() for param in parameters.values()),
        "layers_held": [index for index, layer in enumerate(model.model.layers) if hasattr(layer, "self_attn")],
    }
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
        result["logits"] = None if logits is None else full(logits)
    result["tokens"] = model.generate(INPUT_IDS, max_new_tokens=6, do_sample=False)
    if mode == "tp":
        result["losses"] = train_steps(model)
        result["trained"] = {name: full(tensor).detach() for name, tensor in model.state_dict().items()}
    torch.save(result, Path(out_dir) / f"{mode}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
