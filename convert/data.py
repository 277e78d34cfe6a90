"""Text for calibration, healing and evaluation, read through 🤗 `datasets`, tokenised and packed into blocks.

A source is a plain-text file (`.txt`, `.raw`, `.text`, `.md`), a JSON Lines / JSON, Parquet or CSV file, or a
folder written by `Dataset.save_to_disk`, optionally with a weight, a text column and a split:

    PATH[,weight=W][,column=NAME][,split=NAME]        e.g.  wiki.parquet,weight=2,column=body

Several sources are mixed by weight: of N requested tokens, source i gives N * w_i / sum(w) (whole blocks).
Tokenisation and packing follow transformers' language-modeling examples: `Dataset.map` (batched, cached on
disk for file-backed datasets) tokenises, a second batched map concatenates and cuts the tokens into blocks of
`seq_len`, dropping the remainder. Rows of tabular sources are joined with a blank line.

Each source is split into a fit part and a held-out part before tokenisation: a plain-text file read whole is
cut at 90% of its characters (the last 10% held out); a source with several rows keeps its last 10% of rows
for held out; a streamed source (for files too large to read: `streaming=True`, plain text then comes line by
line) holds out its first blocks and fits on the blocks after them. Bad data is refused with an `UpcycleError`
before any model work: unreadable or empty files, a missing column, too few tokens.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UpcycleError


TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HELD_OUT_FRACTION = 0.1
ROW_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSource:
    path: str
    weight: float = 1.0
    column: str = "text"
    split: str | None = None

    @classmethod
    def parse(cls, spec: "str | os.PathLike | TextSource", column: str = "text") -> "TextSource":
        """`PATH[,weight=W][,column=NAME][,split=NAME]`; `column` is the default text column."""
        if isinstance(spec, TextSource):
            return spec
        path, *options = str(spec).split(",")
        settings = {"column": column}
        for option in options:
            key, _, value = option.partition("=")
            if key not in ("weight", "column", "split") or not value:
                raise UpcycleError(
                    f"cannot read the data source {spec!r}: options are weight=W, column=NAME and split=NAME, "
                    f"got {option!r} (form: PATH[,weight=W][,column=NAME][,split=NAME])."
                )
            settings[key] = value
        try:
            weight = float(settings.pop("weight", 1.0))
        except ValueError:
            raise UpcycleError(f"the weight in data source {spec!r} is not a number.") from None
        if not weight > 0:
            raise UpcycleError(f"the weight in data source {spec!r} must be > 0.")
        return cls(path=path, weight=weight, **settings)

    @property
    def is_plain_text(self) -> bool:
        return Path(self.path).suffix.lower() in TEXT_SUFFIXES


def blocks_of(ids: torch.Tensor | list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """The one way text is cut: consecutive tokens as [n, seq_len] blocks, the remainder (and anything past
    `max_tokens`) dropped."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    usable = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    usable = usable // seq_len * seq_len
    return ids[:usable].view(-1, seq_len)


class TokenBlocks(torch.utils.data.Dataset):
    """Blocks of token ids as a causal-LM training set for `Trainer` (labels = inputs)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


# ------------------------------------------------------------------------------------------------ reading


def _load(source: TextSource, streaming: bool):
    """The source as a `datasets` Dataset (or IterableDataset when streaming) with its text in `source.column`."""
    import datasets

    path = Path(source.path)
    if not path.exists():
        raise UpcycleError(f"data source {path} does not exist.")
    if path.is_file() and path.stat().st_size == 0:
        raise UpcycleError(f"data source {path} is empty.")
    try:
        if path.is_dir():
            if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json")):
                raise UpcycleError(
                    f"{path} is a folder but not one written by `Dataset.save_to_disk`: name its data files instead."
                )
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                split = source.split or ("train" if "train" in dataset else next(iter(dataset)) if len(dataset) == 1 else None)
                if split not in dataset:
                    raise UpcycleError(f"{path} holds the splits {sorted(dataset)}: choose one with split=NAME.")
                dataset = dataset[split]
            if streaming:
                dataset = dataset.to_iterable_dataset()
        elif source.is_plain_text:
            # Read whole, a file is one document (its 90/10 split is by characters); streamed, it comes by lines.
            dataset = datasets.load_dataset(
                "text", data_files=str(path), split="train", streaming=streaming, keep_linebreaks=True,
                sample_by="line" if streaming else "document",
            )
            if source.column != "text":
                dataset = dataset.rename_column("text", source.column)
        elif path.suffix.lower() in BUILDERS:
            dataset = datasets.load_dataset(
                BUILDERS[path.suffix.lower()], data_files=str(path), split=source.split or "train", streaming=streaming
            )
        else:
            known = ", ".join(TEXT_SUFFIXES + tuple(BUILDERS))
            raise UpcycleError(f"cannot tell the format of {path}: use a file ending in {known}, or a saved dataset folder.")
    except UpcycleError:
        raise
    except (OSError, ValueError, TypeError, KeyError, StopIteration, datasets.exceptions.DatasetGenerationError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UpcycleError(f"cannot read data source {path}: {message}") from None
    columns = dataset.column_names
    if columns is None:  # a stream whose columns are only known once it is read: look at its first row
        first = next(iter(dataset), None)
        if first is None:
            raise UpcycleError(f"data source {path} is empty.")
        columns = list(first)
    if source.column not in columns:
        raise UpcycleError(
            f"data source {path} has no column {source.column!r} (its columns: {', '.join(columns)}): name the text "
            f"column with {path},column=NAME or --text-column NAME."
        )
    return dataset.select_columns([source.column])


def _fit_and_held_out(dataset, source: TextSource):
    """Split a (non-streamed) source into its fit and held-out parts, as the module docstring says."""
    import datasets

    if len(dataset) == 0:
        raise UpcycleError(f"data source {source.path} is empty.")
    if len(dataset) == 1:  # one document: cut its text
        text = dataset[0][source.column] or ""
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        part = lambda piece: datasets.Dataset.from_dict({source.column: [piece]})
        return part(text[:cut]), part(text[cut:])
    cut = int(len(dataset) * (1 - HELD_OUT_FRACTION))
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))


def _token_blocks(dataset, source: TextSource, tokenizer, seq_len: int):
    """Tokenise and pack with two batched `map`s (cached for file-backed datasets). Returns a dataset of blocks."""
    column, separator = source.column, "" if source.is_plain_text else ROW_SEPARATOR

    def tokenize(batch):
        texts = [(text or "") + separator for text in batch[column]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = len(ids) // seq_len * seq_len
        return {"input_ids": [ids[start : start + seq_len] for start in range(0, usable, seq_len)]}

    map_kwargs = {} if _is_streamed(dataset) else {"desc": f"tokenising {Path(source.path).name}"}
    tokens = dataset.map(tokenize, batched=True, remove_columns=[column], **map_kwargs)
    # One group for all rows (batch_size=None) for a loaded dataset, so no tokens are lost between batches.
    group_kwargs = {} if _is_streamed(dataset) else {"batch_size": None, "desc": "packing blocks"}
    return tokens.map(group, batched=True, **group_kwargs)


def _is_streamed(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _take(blocks, count: int) -> list[list[int]]:
    if _is_streamed(blocks):
        return [row["input_ids"] for row, _ in zip(blocks, range(count))]
    return blocks.select(range(min(count, len(blocks))))["input_ids"]


def _shares(total_blocks: int, weights: list[float]) -> list[int]:
    """Whole blocks per source in proportion to the weights, summing to `total_blocks` (largest remainders)."""
    exact = [total_blocks * weight / sum(weights) for weight in weights]
    shares = [int(x) for x in exact]
    for index in sorted(range(len(exact)), key=lambda i: exact[i] - shares[i], reverse=True)[: total_blocks - sum(shares)]:
        shares[index] += 1
    return shares


@dataclass
class TokenSplits:
    fit: torch.Tensor  # [n, seq_len], the mix the weights ask for
    held_out: torch.Tensor  # [m, seq_len], from every source in the same proportions (may be empty)


def load_token_blocks(sources, tokenizer, seq_len: int, tokens: int, held_out_tokens: int = 0,
                      text_column: str = "text", streaming: bool = False) -> TokenSplits:
    """Fit and held-out blocks from one or several sources (see the module docstring). `tokens` and
    `held_out_tokens` are budgets, rounded down to whole blocks."""
    sources = [TextSource.parse(spec, column=text_column) for spec in sources]
    if not sources:
        raise UpcycleError("no data source given.")
    if tokens < seq_len:
        raise UpcycleError(f"{tokens} tokens is less than one block of {seq_len}: ask for more tokens.")
    weights = [source.weight for source in sources]
    fit_shares = _shares(tokens // seq_len, weights)
    held_out_shares = _shares(held_out_tokens // seq_len, weights)
    fit, held_out = [], []
    for source, fit_share, held_out_share in zip(sources, fit_shares, held_out_shares):
        dataset = _load(source, streaming)
        if streaming:
            blocks = _token_blocks(dataset, source, tokenizer, seq_len)
            rows = _take(blocks, held_out_share + fit_share)
            source_held_out, source_fit = rows[:held_out_share], rows[held_out_share:]
        else:
            fit_part, held_out_part = _fit_and_held_out(dataset, source)
            source_fit = _take(_token_blocks(fit_part, source, tokenizer, seq_len), fit_share)
            source_held_out = _take(_token_blocks(held_out_part, source, tokenizer, seq_len), held_out_share)
        for what, rows, share in (("fit", source_fit, fit_share), ("held-out", source_held_out, held_out_share)):
            if len(rows) < share and (what == "fit" or not rows):
                raise UpcycleError(
                    f"data source {source.path} gives {len(rows) * seq_len} tokens for its {what} part, fewer than "
                    f"the {share * seq_len} its share asks for: add text, or ask for fewer tokens."
                )
        fit += source_fit
        held_out += source_held_out
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long).view(-1, seq_len)
    return TokenSplits(fit=as_tensor(fit), held_out=as_tensor(held_out))
