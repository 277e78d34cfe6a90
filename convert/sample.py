"""Text sampled from the source model itself: calibration data for gqe-upcycle that needs no data at all.

    gqe-sample-text SRC sampled.txt [--gguf-file NAME] [--sequences 256] [--length 512] [--seed 0] [--chat]
    gqe-upcycle SRC OUT --mode sparse --calibration-data sampled.txt [your own text ...]

Each sequence starts from one token drawn uniformly from the tokenizer's vocabulary (special tokens excluded), then
is sampled (by default at temperature 1 with no top-k or top-p), never stopping early: text that follows the model's
own distribution over everything it was trained on (the idea of LLM-QAT's data-free distillation). `--top-p` and a
`--temperature` below 1 cut the distribution's tail, one above 1 widens it; as calibration text, top-p 0.9 and
temperature 1.1 both did worse than the defaults on every unseen domain (bench/RESULTS.md, "Sampling closer to the
model's likeliest text", "A hotter sample"). Calibrating on it keeps a conversion good on kinds of text no
calibration file holds (bench/RESULTS.md, "Text sampled from the source itself"). Sequences are separated by blank
lines (the text may hold blank lines of its own); special tokens are left out of the decoded text. The same seed
gives the same text on the same machine and library versions.

`--chat` starts every sequence instead from the opening of a user's turn in the tokenizer's chat template (its
system prompt and the user's role marker, nothing of the user's own): an instruction-tuned source then writes a
request and its answer, the kind of text it was tuned on (Magpie's "pre-query template" synthesis, Xu et al. 2024).
The template's opening is not written; between turns its special tokens are left out and the role names after them
("assistant") stay as words. For SmolLM2, such text in the calibration or healing mix moved the zero-shot scores by
0.1 points (paired error 0.3) and perplexity by at most 1.3% (bench/RESULTS.md, "What HellaSwag's WikiHow part lacks").
"""

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cli import option, run_command, with_overrides
from .errors import UpcycleError
from .sources import read_source_config, read_source_tokenizer, read_source_weights
from .staging import check_output, staged_file


@dataclass
class SampleOptions:
    gguf_file: str | None = option(None, "GGUF file name inside SRC")
    sequences: int = option(256, "sequences to sample")
    length: int = option(512, "tokens sampled per sequence (after the first, drawn from the vocabulary)")
    batch_size: int = option(32, "sequences sampled together")
    seed: int = option(0, "sampling seed")
    temperature: float = option(1.0, "sampling temperature (1: the model's own distribution)")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens up to this probability (1: all)")
    chat: bool = option(False, "start each sequence from the chat template's opening of a user turn (an instruction-"
                               "tuned source then writes requests and answers); needs a tokenizer with a chat template")
    force: bool = option(False, "replace OUT if it exists")


def user_turn_opening(tokenizer) -> list[int]:
    """The token ids of the chat template's text before a user's first message: the system prompt (if the template
    adds one) and the user's role marker. Found by rendering one user message and cutting at it."""
    if not getattr(tokenizer, "chat_template", None):
        raise UpcycleError("--chat needs a tokenizer with a chat template, and this source's has none: sample without "
                           "--chat, or give the source an instruction-tuned checkpoint's tokenizer files.")
    marker = "\x00user message\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    if marker not in rendered:
        raise UpcycleError("--chat: the tokenizer's chat template does not write the user's message as given, so the "
                           "opening of a user turn cannot be found; sample without --chat.")
    return tokenizer(rendered[:rendered.index(marker)], add_special_tokens=False).input_ids


def sample_source_text(model, tokenizer, sequences: int, length: int, batch_size: int = 32, seed: int = 0,
                       temperature: float = 1.0, top_p: float = 1.0, chat: bool = False) -> list[str]:
    """`sequences` texts of `length` sampled tokens each, from `model` (a causal LM in eval mode). Seeds torch's
    global generator with `seed`, which both the first tokens and generate() draw from. With `chat`, every sequence
    starts from the chat template's opening of a user turn, which the returned texts leave out."""
    torch.manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    # The tokenizer's ids only: embeddings are often padded past the tokenizer (Qwen2), rows that decode to nothing.
    vocabulary = min(len(tokenizer), model.config.vocab_size)
    first_tokens = torch.tensor([i for i in range(vocabulary) if i not in special])
    opening = torch.tensor([user_turn_opening(tokenizer)]) if chat else None
    texts = []
    with tqdm(total=sequences, desc="sampling", unit="sequence") as progress:
        for done in range(0, sequences, batch_size):
            batch = min(batch_size, sequences - done)
            if chat:
                prompt = opening.expand(batch, -1)
            else:
                prompt = first_tokens[torch.randint(len(first_tokens), (batch, 1))]
            with torch.no_grad():
                sampled = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature, top_k=0,
                    top_p=top_p, max_new_tokens=length, min_new_tokens=length, eos_token_id=None,
                    pad_token_id=tokenizer.pad_token_id or 0,
                )
            # The chat opening is the template's, not the model's: only what was sampled after it is kept.
            texts += tokenizer.batch_decode(sampled[:, prompt.shape[1]:] if chat else sampled, skip_special_tokens=True)
            progress.update(batch)
    return texts


def write_sampled_text(src: str, out, options: SampleOptions | None = None, **overrides) -> dict:
    """Sample text from the checkpoint SRC and write it to the file OUT, whole or not at all. Options as
    `SampleOptions` and/or keyword overrides. Returns a report."""
    options = with_overrides(options or SampleOptions(), overrides)
    for name in ("sequences", "length", "batch_size"):
        if getattr(options, name) < 1:
            raise UpcycleError(f"--{name.replace('_', '-')} is {getattr(options, name)}: it must be at least 1.")
    if not options.temperature > 0:
        raise UpcycleError(f"--temperature is {options.temperature}: it must be above 0 (1 samples the model's own "
                           "distribution; lower values sharpen it).")
    if not 0 < options.top_p <= 1:
        raise UpcycleError(f"--top-p is {options.top_p}: it must be above 0 and at most 1 (1 keeps every token).")
    check_output(out, options.force, is_file=True)  # before any model work
    config = read_source_config(src, options.gguf_file)
    tokenizer = read_source_tokenizer(src, options.gguf_file)
    if tokenizer is None:
        raise UpcycleError(f"{src} has no tokenizer: sampling text needs one (add its tokenizer files).")
    if options.chat:
        user_turn_opening(tokenizer)  # a tokenizer without a chat template is refused before the weights are read
    model = read_source_weights(src, options.gguf_file, config)
    texts = sample_source_text(model, tokenizer, options.sequences, options.length, options.batch_size, options.seed,
                               options.temperature, options.top_p, options.chat)
    with staged_file(out, options.force) as partial:  # an interrupted run leaves no half-written file
        partial.write_text("\n\n".join(texts))
    report = {"sequences": len(texts), "tokens per sequence": options.length, "characters": sum(map(len, texts)),
              "temperature": options.temperature, "top_p": options.top_p, "chat": options.chat}
    print(f"wrote {out}: {report['sequences']} sequences of {options.length} sampled tokens, "
          f"{report['characters']} characters")
    return report


def main(argv=None) -> int:
    return run_command(
        "gqe-sample-text", __doc__, SampleOptions,
        [("src", "Transformers folder, hub id, or folder holding the GGUF file of --gguf-file"),
         ("out", "the text file to write")],
        lambda src, out, options: write_sampled_text(src, out, options), argv,
    )


if __name__ == "__main__":
    sys.exit(main())
