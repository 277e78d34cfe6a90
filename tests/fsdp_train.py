"""Trains a routed GQE model sharded with FSDP2 (`fully_shard`, what `accelerate launch --fsdp_version 2` applies)
for a few steps (run by tests/test_distributed.py).

    torchrun --nproc_per_node 2 tests/fsdp_train.py OUT_DIR   # CPU: gloo

Each decoder layer is one FSDP unit (`_no_split_modules`), so its router, projections and MLP are sharded across the
ranks and gathered for its forward and backward. Each rank trains on its half of every global batch. Rank 0 writes
OUT_DIR/fsdp.pt: the full (gathered) state dict after training, the losses of both ranks and the shard shapes seen.
Run without torchrun, `train` is the single-process reference the test compares with.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from convert.data import blocks_of
from convert.resources import SHAKESPEARE, data_file
from modeling_gqe import GQEConfig, GQEForCausalLM

STEPS, GLOBAL_BATCH, SEQ_LEN = 5, 8, 32


def build_model() -> GQEForCausalLM:
    torch.manual_seed(0)
    config = GQEConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=None,
        eos_token_id=None, router_aux_loss_coef=0.01,
    )
    model = GQEForCausalLM(config)
    with torch.no_grad():  # routers start at zero (ties); random ones make the selection, and its gradient, real
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(0, 0.5)
    return model


def global_batches() -> torch.Tensor:
    """[STEPS, GLOBAL_BATCH, SEQ_LEN] bytes of tinyshakespeare."""
    data = blocks_of(list(data_file(SHAKESPEARE).read_bytes()), SEQ_LEN, max_tokens=STEPS * GLOBAL_BATCH * SEQ_LEN)
    return data.view(STEPS, GLOBAL_BATCH, SEQ_LEN)


def train(model: GQEForCausalLM, parts: int, part: int | None = None) -> list[float]:
    """AdamW steps on `global_batches()`. With `part`, on that rank's share of each batch (the data-parallel
    gradient is the mean of the ranks'); without, on the whole batch with the loss averaged over the `parts`
    shares, which is what the data-parallel ranks compute together (the load-balancing loss is per share)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    share = GLOBAL_BATCH // parts
    losses = []
    for batch in global_batches():
        shares = batch.split(share) if part is None else [batch[part * share : (part + 1) * share]]
        loss = sum(model(ids, labels=ids).loss for ids in shares) / len(shares)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(out_dir: str):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = build_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    router = model.model.layers[0].self_attn.router.weight
    shard_shapes = {"router": tuple(router.to_local().shape), "router_full": tuple(router.shape)}
    losses = train(model, parts=world_size, part=rank)
    gathered_losses = [None] * world_size
    dist.all_gather_object(gathered_losses, losses)
    state = {name: tensor.full_tensor() for name, tensor in model.state_dict().items()}  # every rank takes part
    if rank == 0:
        torch.save({"world_size": world_size, "state": state, "losses": gathered_losses, "shards": shard_shapes},
                   Path(out_dir) / "fsdp.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
