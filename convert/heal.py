"""Heal a sparse-converted GQE model: a short fine-tune with `Trainer`, distilling from the source's logits.

    gqe-heal CONVERTED SRC OUT --text-file TXT [--gguf-file NAME] [--tokens 100000] [--seq-len 256]
    gqe-heal CONVERTED SRC OUT --data wiki.parquet,weight=2 notes.jsonl,column=body [--streaming]

The loss is `alpha * KL(source || GQE) + (1 - alpha) * the model's own training loss` (the LM loss plus the
router's load-balancing term, which the model adds itself while training). The default, alpha = 1, is pure
distillation: it pulls the converted model back towards the source's behaviour on any text, where the LM loss also
adapts it to the training text (bench/RESULTS.md measures both). It has no balancing term: the router is balanced
by construction at conversion and stays so (K = 2 SmolLM2: router entropy 0.99 before and after). Training text
comes through the same data path as calibration (convert/data.py): the fit part of each source is trained on, its
held-out part measured. Prints held-out perplexity of the source and of GQE before and after healing.
"""

import math
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from modeling_gqe import GQERoutingCallback

from .cli import option, run_command, with_overrides
from .data import TokenBlocks, load_token_blocks
from .errors import UpcycleError
from .evaluate import perplexity
from .sources import read_gqe_checkpoint, read_source_config, read_source_tokenizer, read_source_weights
from .staging import check_output, staged_output


def place_teacher(teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move the teacher to the student's device and floating dtype (through `nn.Module.to`: GGUF-loaded models
    carry a quantized flag that makes `PreTrainedModel.to` refuse dtype changes, though they hold plain floats)."""
    return torch.nn.Module.to(teacher, device=device, dtype=dtype)


class DistillationTrainer(Trainer):
    """`Trainer` whose loss also pulls the student's next-token distribution towards a frozen teacher's.

    The teacher follows the student: it is moved to the device and dtype of the student's parameters at the first
    step (after Trainer or accelerate has placed the student), and runs under the same autocast."""

    def __init__(self, *args, teacher, alpha: float = 1.0, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_weight = next(model.parameters())
        teacher_weight = next(self.teacher.parameters())
        if (teacher_weight.device, teacher_weight.dtype) != (student_weight.device, student_weight.dtype):
            self.teacher = place_teacher(self.teacher, student_weight.device, student_weight.dtype)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        t = self.temperature
        student = F.log_softmax(outputs.logits.float() / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
        distillation = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean() * t * t
        loss = self.alpha * distillation + (1 - self.alpha) * outputs.loss
        return (loss, outputs) if return_outputs else loss


TRAINABLE_PARTS = {"all": None, "attention": ".self_attn."}


def check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLE_PARTS:
        raise UpcycleError(f"--trainable {trainable!r} is not a part of the model; choose one of "
                           f"{sorted(TRAINABLE_PARTS)}.")


def check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UpcycleError(f"--epochs {epochs!r}: healing needs a whole number of passes over its text, 1 or more.")


def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise UpcycleError(f"--alpha {alpha!r}: the distillation weight must be between 0 (LM loss only) and 1 "
                           "(distillation only, the default).")


def set_trainable(model: torch.nn.Module, trainable: str) -> None:
    """Freeze every parameter outside `trainable` ("all", or "attention": every layer's self_attn, router and
    shared head included). Healing only the attention changes only
    the part the sparse conversion replaced and leaves the embeddings and MLPs as the source trained them."""
    check_trainable(trainable)
    part = TRAINABLE_PARTS[trainable]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(part is None or part in name)


def distill(student, teacher, train_ids: torch.Tensor, output_dir, batch_size: int = 4, learning_rate: float = 1e-4,
            alpha: float = 1.0, seed: int = 0, callbacks=None, trainable: str = "all",
            epochs: int = 1) -> list[float]:
    """`epochs` passes of `DistillationTrainer` over `train_ids` (blocks x seq_len), one cosine schedule over all of
    them; returns the logged losses.

    Shared by `heal` and by the benchmark's control that gives the dense source the same fine-tune. `trainable`
    chooses the parameters trained (`set_trainable`). On a GPU with bf16 support, fp32 students train in bf16
    mixed precision."""
    check_epochs(epochs)
    check_alpha(alpha)
    set_trainable(student, trainable)
    steps = math.ceil(train_ids.shape[0] / batch_size) * epochs
    # 5% of the steps warm up. A linear warm-up's first step has rate 0, so a one-step warm-up only wastes a step:
    # heals of under 20 steps get none (with one, a one-step heal would leave the model exactly as it was).
    warmup_steps = steps // 20
    mixed_precision = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                       and next(student.parameters()).dtype == torch.float32)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=warmup_steps, weight_decay=0.0,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to=[],
        seed=seed, use_cpu=not torch.cuda.is_available(), bf16=mixed_precision, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(
        model=student.train(), args=args, train_dataset=TokenBlocks(train_ids), teacher=teacher, alpha=alpha,
        callbacks=callbacks,
    )
    trainer.train()
    student.eval().requires_grad_(True)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@dataclass
class HealOptions:
    text_file: str | None = option(None, "a plain-text file to train on (its last 10%% is held out)")
    data: list[str] = option([], "data sources PATH[,weight=W][,column=NAME][,split=NAME], mixed by weight "
                             "(text, JSONL, Parquet, CSV files or save_to_disk folders)")
    text_column: str = option("text", "default text column of tabular data sources")
    streaming: bool = option(False, "stream the data sources (held out = their first blocks)")
    gguf_file: str | None = option(None, "GGUF file name inside SRC")
    tokens: int = option(100_000, "training tokens (read once, trained on --epochs times)")
    epochs: int = option(1, "passes over the training tokens (the cosine schedule spans all of them)")
    held_out_tokens: int = option(8192, "held-out tokens on which perplexity is reported")
    seq_len: int = option(256, "training sequence length")
    batch_size: int = option(4, "sequences per step")
    learning_rate: float = option(1e-4, "peak learning rate (cosine schedule)")
    alpha: float = option(1.0, "weight of the distillation loss (1 - alpha: the LM loss); 1 heals towards the source "
                          "everywhere, below 1 also adapts the model to the training text")
    trainable: Literal["all", "attention"] = option(
        "all", "parameters trained: all, or attention (every layer's attention with its router and shared head; "
        "embeddings, norms and MLPs stay the source's)")
    force: bool = option(False, "replace OUT if it exists")
    seed: int = option(0, "training seed")

    @property
    def data_sources(self) -> list[str]:
        return ([self.text_file] if self.text_file else []) + list(self.data)


def heal(converted: str, src: str, out, options: HealOptions | None = None, **overrides) -> dict:
    """Fine-tune the GQE checkpoint CONVERTED towards its source SRC; write the result to OUT. Options as
    `HealOptions` and/or keyword overrides (an unknown name raises TypeError). Returns a report."""
    options = with_overrides(options or HealOptions(), overrides)
    if not options.data_sources:
        raise UpcycleError("gqe-heal needs training text: --text-file TXT or --data SOURCE.")
    check_trainable(options.trainable)  # before any model work
    check_epochs(options.epochs)
    check_alpha(options.alpha)
    check_output(out, options.force)
    source_config = read_source_config(src, options.gguf_file)
    tokenizer = read_source_tokenizer(src, options.gguf_file)
    if tokenizer is None:
        raise UpcycleError(f"{src} has no tokenizer, which healing needs to read the text.")
    data = load_token_blocks(options.data_sources, tokenizer, options.seq_len, options.tokens, options.held_out_tokens,
                             options.text_column, options.streaming)
    student = read_gqe_checkpoint(converted)
    teacher = read_source_weights(src, options.gguf_file, source_config)
    report = {}
    if data.held_out.numel():
        report["held-out perplexity (source)"] = perplexity(teacher, data.held_out)
        report["held-out perplexity (GQE before healing)"] = perplexity(student, data.held_out)
    with staged_output(out, options.force) as staging, tempfile.TemporaryDirectory() as scratch:
        report["loss history"] = distill(
            student, teacher, data.fit, scratch, batch_size=options.batch_size, learning_rate=options.learning_rate,
            alpha=options.alpha, seed=options.seed, callbacks=[GQERoutingCallback()], trainable=options.trainable,
            epochs=options.epochs,
        )
        report["healing tokens"] = int(data.fit.numel())
        report["healing passes"] = options.epochs
        if data.held_out.numel():
            report["held-out perplexity (GQE after healing)"] = perplexity(student, data.held_out)
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    if data.held_out.numel():
        passes = f" x {options.epochs} passes" if options.epochs > 1 else ""
        print(
            f"held-out perplexity: source {report['held-out perplexity (source)']:.2f}, GQE before healing "
            f"{report['held-out perplexity (GQE before healing)']:.2f}, after {report['healing tokens']} tokens"
            f"{passes} {report['held-out perplexity (GQE after healing)']:.2f}"
        )
    return report


def main(argv=None) -> int:
    return run_command(
        "gqe-heal", __doc__, HealOptions,
        [("converted", "GQE folder written by gqe-upcycle --mode sparse"),
         ("src", "the source checkpoint it was converted from (the teacher)"),
         ("out", "output folder for the healed model")],
        lambda converted, src, out, options: heal(converted, src, out, options), argv,
    )


if __name__ == "__main__":
    sys.exit(main())
