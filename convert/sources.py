"""Reading a source checkpoint: its config, tokenizer and weights, each checked so that a problem with the user's
files ends in one `UpcycleError` naming the file and the fix, never in a traceback from deep inside a loader.

Three steps, so that a conversion can check everything cheap (config, tokenizer, data) before loading weights:
`read_source_config` -> `read_source_tokenizer` -> `read_source_weights` (or `load_source` for all three).
"""

import copy
from pathlib import Path

import torch

from .errors import UpcycleError
from .families import family_of


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_location(src: str, gguf_file: str | None) -> Path | None:
    """The local folder of SRC (None for a hub id), after checking that what SRC names exists."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise UpcycleError(f"{path} is a file: SRC must be a checkpoint folder (with --gguf-file NAME for GGUF).")
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise UpcycleError(f"{path / gguf_file} does not exist: --gguf-file names a file inside SRC.")
        elif not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds {ggufs}: pass --gguf-file {ggufs[0]}." if ggufs else ""
            raise UpcycleError(f"{path} has no config.json: SRC must be a Transformers checkpoint folder.{hint}")
        return path
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UpcycleError(f"{src} does not exist: give a checkpoint folder or a hub id (owner/name).")
    return None


def _check_weight_files(folder: Path, gguf_file: str | None) -> None:
    """Open every weight file's header before transformers does, so a truncated or corrupt file is named."""
    if gguf_file is not None:
        from gguf import GGUFReader

        path = folder / gguf_file
        try:
            GGUFReader(path)
        except Exception as error:  # the reader parses the user's bytes; anything it raises means a broken file
            raise UpcycleError(
                f"{path} is not a readable GGUF file ({_first_line(error)}): it is truncated or corrupt. "
                "Download it again."
            ) from None
        return
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise UpcycleError(
                f"{path} cannot be read ({_first_line(error)}): the file is truncated or corrupt. "
                "Download or save the checkpoint again."
            ) from None


def read_source_config(src: str, gguf_file: str | None = None):
    """The source's config, refused with a clear reason if the converter cannot carry it (see families.py)."""
    from transformers import AutoConfig

    folder = _check_location(src, gguf_file)
    if folder is not None and gguf_file is None:
        _check_weight_files(folder, None)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except Exception as error:
        if folder is not None and gguf_file is not None:
            # Reading a GGUF config parses the whole file, so its check runs only when that fails (checking first
            # would parse it twice); a truncated or corrupt file is then named as such.
            _check_weight_files(folder, gguf_file)
        if not isinstance(error, (OSError, ValueError, KeyError)):
            raise
        where = f"{folder / (gguf_file or 'config.json')}" if folder is not None else f"{src} (hub)"
        raise UpcycleError(f"cannot read the config of {where}: {_first_line(error)}") from None
    family_of(config)
    return config


def read_source_tokenizer(src: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The source's tokenizer, or None when the checkpoint carries none (tiny test checkpoints). A tokenizer that
    is there but cannot be read is an error naming its files. trust_remote_code: for a GQE folder, whose config
    names its own code; without it AutoTokenizer asks on the terminal whether to run that code."""
    from transformers import AutoTokenizer

    folder = Path(src) if Path(src).is_dir() else None
    present = [name for name in TOKENIZER_FILES if folder is not None and (folder / name).is_file()]
    if folder is not None and gguf_file is None and not present:
        return None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as error:
        files = ", ".join(str(folder / name) for name in present) if present else f"{src} {gguf_file or ''}".strip()
        raise UpcycleError(
            f"the tokenizer in {files} cannot be read ({_first_line(error)}): restore the tokenizer files from "
            "the original checkpoint."
        ) from None


def read_source_weights(src: str, gguf_file: str | None = None, config=None) -> torch.nn.Module:
    """The source model in fp32, eval mode (see `read_weights`)."""
    config = config if config is not None else read_source_config(src, gguf_file)
    return read_weights(src, config, gguf_file)


def read_gqe_checkpoint(folder: str) -> torch.nn.Module:
    """A GQE checkpoint folder (written by gqe-upcycle or save_pretrained) in fp32, checked like a source."""
    from transformers import AutoConfig

    path = _check_location(folder, None)
    if path is not None:
        _check_weight_files(path, None)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    except (OSError, ValueError, KeyError) as error:
        raise UpcycleError(f"cannot read the config of {folder}: {_first_line(error)}") from None
    if config.model_type != "gqe":
        raise UpcycleError(f"{folder} is not a GQE checkpoint (model_type {config.model_type!r}): give a folder "
                           "written by gqe-upcycle.")
    return read_weights(folder, config, trust_remote_code=True)


def read_weights(src: str, config, gguf_file: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """A checkpoint's model in fp32, eval mode. Missing tensors or tensors whose shapes do not match the config are
    refused (transformers would initialise them randomly and the result would silently be wrong)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        src, config=config, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True,
        trust_remote_code=trust_remote_code, **kwargs,
    )
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UpcycleError(
            f"the checkpoint {src} lacks weights the config asks for ({shown}): it is incomplete. "
            "Download or save it again."
        )
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        name, found, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise UpcycleError(
            f"the weights of {src} do not match its config.json: {name} is {tuple(found)} in the checkpoint but "
            f"the config implies {tuple(expected)}{more}. Use the config.json that came with these weights."
        )
    return model.eval()


def loaded_from_gguf(model: torch.nn.Module) -> bool:
    """Whether transformers' GGUF quantizer loaded `model` (its weights then are plain, dequantised floats)."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return method == "gguf"


def as_plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A GGUF-loaded model holds plain fp32 weights (transformers dequantises them) but keeps a "quantized" flag,
    which makes Trainer refuse to train it and `.to(dtype)` refuse to cast it. This returns an unflagged model of
    the same class with the same weights (the model itself when it was not loaded from a GGUF: a model whose weights
    really are quantized, e.g. by torchao, stays as it is)."""
    from transformers.initialization import no_init_weights

    if not loaded_from_gguf(model):
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # else save_pretrained writes it and the folder claims to be GGUF
        del config.quantization_config
    with no_init_weights():  # every weight comes from the state dict below (strict)
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.to(next(model.parameters()).dtype).eval()


def load_checkpoint(path: str, gguf_file: str | None = None):
    """Any checkpoint the tools evaluate: a GQE folder or a source (Transformers folder, GGUF, a folder quantized
    by torchao). Returns (model in fp32 eval mode, tokenizer or None); a GGUF's model without its quantized flag."""
    from transformers import AutoConfig

    location = _check_location(path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=True, **kwargs).model_type
    except (OSError, ValueError, KeyError) as error:
        where = location / (gguf_file or "config.json") if location is not None else path
        raise UpcycleError(f"cannot read the config of {where}: {_first_line(error)}") from None
    if model_type == "gqe":
        model = read_gqe_checkpoint(path)
    else:
        model = as_plain_model(read_source_weights(path, gguf_file))
    return model, read_source_tokenizer(path, gguf_file, trust_remote_code=model_type == "gqe")


def load_source(src: str, gguf_file: str | None = None):
    """Config, tokenizer and weights of a source checkpoint. Returns (model in fp32 eval mode, tokenizer or None)."""
    config = read_source_config(src, gguf_file)
    tokenizer = read_source_tokenizer(src, gguf_file)
    return read_source_weights(src, gguf_file, config), tokenizer


def llama_named_state_dict(source) -> dict[str, torch.Tensor]:
    """The source's weights under Llama's names (see families.py), whatever its family."""
    return family_of(source.config).to_llama_names(source.state_dict(), source.config)
