"""Safe writing of output folders and files: never a half-written OUT, never an overwrite without `--force`.

Everything is written into a hidden staging folder beside OUT (`.OUT.partial-XXXX`), which is renamed into place
only when complete; on any failure, interruption included, the staging folder is removed and an existing OUT is
left as it was. With `--force`, the old OUT is removed only after the new one is in place.
A single output file (`staged_file`) is written the same way, as a hidden `.OUT.partial-XXXX` file beside it.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UpcycleError


def check_output(out: str | os.PathLike, force: bool, is_file: bool = False) -> Path:
    """Refuse an existing OUT without `force`, an OUT of the wrong kind (a file where a folder is written, or the
    reverse with `is_file`), and an OUT whose parent cannot be written, before any work."""
    out = Path(out)
    if is_file and out.is_dir():
        raise UpcycleError(f"{out} is a folder: OUT is the file to write; name a file.")
    if out.exists() and not force:
        raise UpcycleError(f"{out} already exists: choose another OUT or pass --force to replace it.")
    if out.exists() and not is_file and not out.is_dir():
        raise UpcycleError(f"{out} exists and is not a folder: choose another OUT.")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UpcycleError(f"cannot create the folder {parent} for OUT ({error.strerror}): choose another OUT.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UpcycleError(f"cannot write into {parent} (permission denied): choose an OUT in a writable folder.")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, force: bool):
    """`with staged_output(OUT, force) as staging: write into staging` -> OUT holds exactly what was written."""
    out = check_output(out, force)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise UpcycleError(f"cannot write into {out.parent} ({error.strerror}): choose another OUT.") from None
    try:
        yield staging
        _move_into_place(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise UpcycleError(f"could not write {out} ({error.strerror}): free space or choose another OUT.") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: str | os.PathLike, force: bool):
    """`with staged_file(OUT, force) as partial: write the file partial` -> OUT is exactly that file, or untouched."""
    out = check_output(out, force, is_file=True)
    try:
        descriptor, partial = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as error:
        raise UpcycleError(f"cannot write into {out.parent} ({error.strerror}): choose another OUT.") from None
    os.close(descriptor)
    os.chmod(partial, 0o644)  # mkstemp's 0600 is for secrets; this is a data file
    try:
        yield Path(partial)
        os.replace(partial, out)
    except OSError as error:
        Path(partial).unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise UpcycleError(f"could not write {out} ({error.strerror}): free space or choose another OUT.") from None
        raise
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _move_into_place(staging: Path, out: Path) -> None:
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
    staging.rename(out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def model_card(title: str, summary: str, table: dict, tags: list[str], base_model: str | None = None) -> "ModelCard":
    """A model card (`huggingface_hub.ModelCard`) with metadata, a summary, a table of figures and the loading code."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=base_model)
    rows = "\n".join(
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |" for key, value in table.items()
    )
    body = (
        f"# {title}\n\n{summary}\n\n| | |\n|---|---|\n{rows}\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
