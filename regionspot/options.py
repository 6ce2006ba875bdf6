"""Options declared once: a field of a stage config carries its command-line help and lower bound.

The CLI builds each typer option from its config field (typer then lists the choices, shows the
default and refuses a bad value before any code runs, exit code 2); `check_options` applies the same
choices and bounds to a config built in Python and names the same flags. A field's choices are its
`Literal` type. A field with `flag=False` is set only by a recipe (`train`); messages call it
"recipe value NAME", never a flag that does not exist.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    min: int | None = None,
    flag: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its command-line help and lower bound (a `dataclasses.field`).

    Args:
        default, default_factory: as `dataclasses.field`.
        help: the --help text.
        min: the smallest value an int field takes (None: unbounded); typer enforces it on the
            command line, `check_options` in Python.
        flag: False for a value with no command-line flag (a recipe sets it).
    """
    metadata = {"help": help, "min": min, "flag": flag}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def storage_options_option(urls: str) -> Any:
    """The `storage_options` field of a stage that reads or writes shard sets by URL (extract, eval,
    train): one help, naming the flags (`urls`, e.g. "--out URL's") whose filesystem it configures."""
    return option(
        None, f"Options of the {urls} fsspec filesystem as JSON (endpoint_url, profile, ...); credentials "
        "usually come from the protocol's own environment variables and files. Never printed."
    )  # fmt: skip


def field_metadata(config: Any, name: str) -> Mapping[str, Any]:
    """The help, min and flag of field `name` of a config class or instance."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return {"help": "", "min": None, "flag": True, **f.metadata}
    raise KeyError(f"no config field {name!r}")


def flag_name(config: Any, name: str) -> str:
    """How a message names field `name`: its flag (`--batch-size`), or `recipe value NAME` when it has none."""
    if field_metadata(config, name)["flag"]:
        return f"--{name.replace('_', '-')}"
    return f"recipe value {name}"


def choices(annotation: Any) -> tuple | None:
    """The values a `Literal` type (or an optional one) allows; None for any other type."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):  # Literal[...] | None
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def _is_int(annotation: Any) -> bool:
    """int, or int | None."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return annotation is int or (optional and int in typing.get_args(annotation))


def check_options(config: Any) -> list[str]:
    """What typer would have refused in a config built in Python: a value outside its field's
    `Literal` choices, a non-integer in an int field, an int below the field's `min`. None (unset)
    passes. Returns one message per bad value, naming its flag."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        name, annotation = flag_name(config, f.name), hints[f.name]
        allowed = choices(annotation)
        if allowed is not None:
            # by type too: True == 1, but --sam-tokens True is not a choice
            if not any(value == c and type(value) is type(c) for c in allowed):
                problems.append(f"{name} {value!r}: choose one of {', '.join(map(str, allowed))}")
        elif _is_int(annotation) and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{name} {value!r}: must be an integer")
        elif f.metadata.get("min") is not None and value < f.metadata["min"]:
            problems.append(f"{name} {value}: must be at least {f.metadata['min']}")
    return problems
