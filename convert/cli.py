"""Options defined once: each command's options are a dataclass, which drives both its Python function (with
unknown names refused) and its command line (`HfArgumentParser`), and user errors end as one line."""

import argparse
import dataclasses
import sys
from collections.abc import Callable

from .errors import UpcycleError


def option(default, help: str, **metadata):
    """A dataclass field with its command-line help (`metadata` goes to argparse, e.g. `required=True`, or
    `nargs="*"` for a list option that may be given empty)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def with_overrides(options, overrides: dict):
    """`options` with `overrides` applied; a name that is not an option is refused (a misspelling would otherwise
    be silently ignored)."""
    known = {field.name for field in dataclasses.fields(options)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {type(options).__name__}; the options are {sorted(known)}.")
    return dataclasses.replace(options, **overrides)


def run_command(prog: str, description: str, options_type, positionals: list[tuple[str, str]],
                command: Callable, argv=None) -> int:
    """Parse `argv` into the positional arguments and an `options_type` instance, call
    `command(*positionals, options)`, and turn an `UpcycleError` into one line on stderr and exit status 2."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        options_type, prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(options_type):
        if "nargs" in field.metadata:  # HfArgumentParser gives every list nargs="+"; let a field ask for another
            next(action for action in parser._actions if action.dest == field.name).nargs = field.metadata["nargs"]
    for name, help in positionals:
        parser.add_argument(name, help=help)
    options, *rest = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    arguments = rest[0] if rest else argparse.Namespace()
    try:
        command(*(getattr(arguments, name) for name, _ in positionals), options)
    except UpcycleError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
