"""Heal a sparse-converted GQE model: a short fine-tune with `Trainer`, distilling from the source's logits.

    gqe-heal CONVERTED SRC OUT --text-file TXT [--gguf-file NAME] [--tokens 100000] [--seq-len 256]

The text is split as in calibration (first 90% for training, last 10% held out); the loss is
`alpha * KL(source || GQE) + (1 - alpha) * LM loss` (plus the router's load-balancing term, which the model
adds itself while training). Prints held-out perplexity of source, GQE before and GQE after healing.
"""

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_gqe import GQERoutingCallback

from .calibrate import held_out_perplexity, split_calibration_text
from .upcycle import UpcycleError, load_source, move_into_place, prepare_output


class DistillationTrainer(Trainer):
    """`Trainer` whose loss also pulls the student's next-token distribution towards a frozen teacher's."""

    def __init__(self, *args, teacher, alpha: float = 0.5, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        t = self.temperature
        student = F.log_softmax(outputs.logits.float() / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
        distillation = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean() * t * t
        loss = self.alpha * distillation + (1 - self.alpha) * outputs.loss
        return (loss, outputs) if return_outputs else loss


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def distill(student, teacher, train_ids: torch.Tensor, output_dir, batch_size: int = 4, learning_rate: float = 1e-4,
            alpha: float = 0.5, seed: int = 0, callbacks=None) -> list[float]:
    """One pass of `DistillationTrainer` over `train_ids` (blocks x seq_len), cosine schedule; returns the logged losses.

    Shared by `heal` and by the benchmark's control that gives the dense source the same fine-tune.
    """
    steps = math.ceil(train_ids.shape[0] / batch_size)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[],
        seed=seed, use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student.train(), args=args, train_dataset=TokenBlocks(train_ids), teacher=teacher, alpha=alpha,
        callbacks=callbacks,
    )
    trainer.train()
    student.eval()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def heal(converted: str, src: str, out: str, text_file: str, gguf_file: str | None = None, tokens: int = 100_000,
         seq_len: int = 256, batch_size: int = 4, learning_rate: float = 1e-4, alpha: float = 0.5,
         held_out_tokens: int = 8192, force: bool = False, seed: int = 0) -> dict:
    out_path = Path(out)
    prepare_output(out_path, force)
    if not Path(text_file).is_file():
        raise UpcycleError(f"--text-file {text_file} does not exist.")
    teacher, tokenizer = load_source(src, gguf_file)
    if tokenizer is None:
        raise UpcycleError(f"{src} has no tokenizer, which healing needs to read the text.")
    student = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    if student.config.model_type != "gqe":
        raise UpcycleError(f"{converted} is not a GQE checkpoint (model_type {student.config.model_type!r}).")
    train_ids, held_out_ids = split_calibration_text(
        tokenizer, Path(text_file).read_text(encoding="utf-8"), tokens, seq_len=seq_len, held_out_tokens=held_out_tokens
    )
    report = {
        "held-out perplexity (source)": held_out_perplexity(teacher, held_out_ids),
        "held-out perplexity (GQE before healing)": held_out_perplexity(student, held_out_ids),
    }
    staging = out_path.with_name(f".{out_path.name}.partial")
    try:  # the Trainer's scratch files and the model are staged beside OUT and removed even if training fails
        report["loss history"] = distill(
            student, teacher, train_ids, staging / "trainer", batch_size=batch_size, learning_rate=learning_rate,
            alpha=alpha, seed=seed, callbacks=[GQERoutingCallback()],
        )
        report["held-out perplexity (GQE after healing)"] = held_out_perplexity(student, held_out_ids)
        report["healing tokens"] = int(train_ids.numel())
        student.save_pretrained(staging / "model")
        tokenizer.save_pretrained(staging / "model")
        move_into_place(staging / "model", out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"held-out perplexity: source {report['held-out perplexity (source)']:.2f}, GQE before healing "
        f"{report['held-out perplexity (GQE before healing)']:.2f}, after {report['healing tokens']} tokens "
        f"{report['held-out perplexity (GQE after healing)']:.2f}"
    )
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gqe-heal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("converted", help="GQE folder written by gqe-upcycle --mode sparse")
    parser.add_argument("src", help="the source checkpoint it was converted from (the teacher)")
    parser.add_argument("out", help="output folder for the healed model")
    parser.add_argument("--text-file", required=True, help="plain text to train on (its last 10%% is held out)")
    parser.add_argument("--gguf-file", help="GGUF file name inside SRC")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens (one pass)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation loss")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        heal(args.converted, args.src, args.out, args.text_file, gguf_file=args.gguf_file, tokens=args.tokens,
             seq_len=args.seq_len, batch_size=args.batch_size, learning_rate=args.learning_rate, alpha=args.alpha,
             force=args.force)
    except UpcycleError as error:
        print(f"gqe-heal: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
